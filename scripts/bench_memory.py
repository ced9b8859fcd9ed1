"""Does a worker's memory stay flat over hundreds of candidates? Read after every candidate of real searches.

    python scripts/bench_memory.py                                   # CPU, float32: RSS
    python scripts/bench_memory.py --device cuda --dtype bfloat16    # a GPU: device memory allocated and reserved

Each search runs through the session (preset=toy, serial executor, random search so every candidate is new and
merged, none a cache hit), with the worker's ``evaluate`` wrapped to read memory after it returns: on CUDA
``torch.cuda.memory_allocated`` (tensors alive) and ``memory_reserved`` (the caching allocator's pool), on CPU
the process's resident set; and the number of live Python objects. Searches: TIES (sources, sorted magnitudes and the compiled kernel resident), DARE-TIES
(kept draws) and a data-flow search (a new layer path per candidate). Writes results/bench_memory_<device>.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from hydra import compose, initialize_config_dir

from evomerge.config import CONF_DIR, register_configs
from evomerge.executor.worker import Worker
from evomerge.io.atomic import atomic_write_text
from evomerge.search.session import start
from evomerge.toy.world import BUILDER_VERSION

SEARCHES = {
    "ties (PS)": ["method=ties"],
    "dare_ties (PS)": ["method=dare_ties"],
    "data-flow (DFS)": ["genome=dfs"],
}
MB = 2**20


def memory(device: str) -> dict[str, int]:
    """Device memory (CUDA: tensors alive, the allocator's pool; CPU: the resident set) and live Python objects."""
    if device.startswith("cuda"):
        readings = {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved()}
    else:
        readings = {"rss": psutil.Process().memory_info().rss}
    return readings | {"objects": len(gc.get_objects())}


def run_search(overrides: list[str], work: Path, device: str) -> list[dict[str, int]]:
    """One search; memory read after each candidate its worker scores."""
    readings: list[dict[str, int]] = []
    evaluate = Worker.evaluate

    def watched(worker, recipe, subset=None):  # the executors pass the racing subset (None: every item)
        outcome = evaluate(worker, recipe, subset)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        readings.append(memory(device))
        return outcome

    Worker.evaluate = watched
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        start(cfg, work)
    finally:
        Worker.evaluate = evaluate
    return readings


def growth_row(name: str, readings: list[dict[str, int]]) -> str:
    """After the 1st, 10th and last candidate; growth from the 10th to the last; least-squares slope over the second half."""
    cells = []
    for key in readings[0]:
        series = np.array([r[key] for r in readings], dtype=float)
        half = series[len(series) // 2 :]
        slope = np.polyfit(np.arange(len(half)), half, 1)[0] if len(half) > 1 else 0.0
        tenth = series[min(9, len(series) - 1)]
        if key == "objects":
            cells.append(
                f"Python objects: {series[0]:,.0f} / {tenth:,.0f} / {series[-1]:,.0f}; "
                f"{series[-1] - tenth:+,.0f}; {slope:+,.1f} per candidate"
            )
            continue
        cells.append(
            f"{key}: {series[0] / MB:,.1f} / {tenth / MB:,.1f} / {series[-1] / MB:,.1f} MB; "
            f"{(series[-1] - tenth) / MB:+,.2f} MB; {slope / 1024:+,.1f} KB per candidate"
        )
    return f"| {name} | {len(readings)} | " + "<br>".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--candidates", type=int, default=300, help="evaluations per search (default 300)")
    parser.add_argument("--searches", default=",".join(SEARCHES), help=f"comma-separated, from: {', '.join(SEARCHES)}")
    parser.add_argument("--work", type=Path, default=Path("/tmp/evomerge-bench-memory"))
    parser.add_argument("--out", type=Path, default=None, help="default results/bench_memory_<device type>.md")
    args = parser.parse_args()

    register_configs()
    shutil.rmtree(args.work, ignore_errors=True)
    load_before = os.getloadavg()
    began = time.perf_counter()
    rows = []
    for name in args.searches.split(","):
        overrides = [
            "preset=toy",
            "executor=serial",
            "optimizer=random",
            "seed=1",
            f"device={args.device}",
            f"dtype={args.dtype}",
            f"budget.evaluations={args.candidates}",
            *SEARCHES[name],
        ]
        readings = run_search(overrides, args.work / name.split()[0], args.device)
        rows.append(growth_row(name, readings))
        print(rows[-1], flush=True)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
    lines = [
        f"# Worker memory over {args.candidates} candidates per search ({args.device}, {args.dtype})",
        "",
        f"Written by `python {' '.join(sys.argv)}` in {time.perf_counter() - began:.0f} s; not edited by hand.",
        "",
        f"- Machine: {device_name}, {os.cpu_count()} CPUs, torch {torch.__version__}; load average before "
        f"{load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}.",
        f"- Each search: `preset=toy executor=serial optimizer=random` on the toy world `full-seed0-v{BUILDER_VERSION}` "
        "(every candidate new: merged and scored, none "
        "from the cache), memory read after the worker returns each candidate.",
        "- Columns per reading: after the 1st / 10th / last candidate; growth from the 10th to the last; slope "
        "over the second half. The first candidates pay one-off allocations (what a method precomputes, "
        "compiled kernels, the allocator's pool, lm-eval's first batch); a leak shows as growth after them.",
        "",
        "| search | candidates | memory |",
        "| --- | --- | --- |",
        *rows,
    ]
    out = args.out or Path(f"results/bench_memory_{args.device.split(':')[0]}.md")
    atomic_write_text(out, "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
