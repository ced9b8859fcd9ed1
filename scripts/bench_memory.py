"""Does a worker's memory stay flat over hundreds of candidates? Read after every candidate of real searches.
And does its memory check count what it takes at its peak, on a tied model with a large vocabulary?

    python scripts/bench_memory.py                                   # CPU, float32: RSS
    python scripts/bench_memory.py --device cuda --dtype bfloat16    # a GPU: device memory allocated and reserved
    python scripts/bench_memory.py --peak                            # peak RSS against the check's count

Each search runs through the session (preset=toy, serial executor, random search so every candidate is new and
merged, none a cache hit), with the worker's ``evaluate`` wrapped to read memory after it returns: on CUDA
``torch.cuda.memory_allocated`` (tensors alive) and ``memory_reserved`` (the caching allocator's pool), on CPU
the process's resident set; and the number of live Python objects. Searches: TIES (sources, sorted magnitudes and the compiled kernel resident), DARE-TIES
(kept draws) and a data-flow search (a new layer path per candidate). Writes results/bench_memory_<device>.md.

``--peak``: a tied Gemma 3 of Gemma 3's 262,144-token vocabulary (hidden size 256, 2 layers: the embedding is
most of it, as in Gemma-3-270M), a base and 3 fine-tunes, merged by TIES in float32 on the CPU by a worker that
scores each candidate on the toy tasks (batch 32). Each run is its own process, whose peak resident set
(``ru_maxrss``) is read against what the worker's memory check counted, with glibc's defaults and with
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` raised (as scripts/gpu_check.sh runs: freed memory is
kept for reuse, not given back). Writes results/bench_memory_peak.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from hydra import compose, initialize_config_dir

from evomerge.config import CONF_DIR, register_configs
from evomerge.executor.worker import Worker, WorkerSpec
from evomerge.io.atomic import atomic_write_text
from evomerge.search.session import start
from evomerge.toy.world import BUILDER_VERSION

# glibc keeps freed blocks up to these sizes for reuse (scripts/gpu_check.sh sets them for speed).
RAISED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
PEAK_MODEL = dict(vocab_size=262_144, hidden_size=256, intermediate_size=512, num_hidden_layers=2, head_dim=64)
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


def tiny_world():
    """The tiny toy world (its tokenizer and tasks), where the tests keep it if they do."""
    from evomerge.toy.world import build_world

    return build_world(size="tiny", seed=0, root=os.environ.get("EVOMERGE_TEST_CACHE"))


def build_peak_world(root: Path) -> list[Path]:
    """The base and 3 fine-tunes of a tied Gemma 3 with a 262,144-token vocabulary (tests/families.py's sizes
    otherwise), saved with the toy world's word-level tokenizer (its ids are valid rows of any vocabulary)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.families import FAMILIES, SIZES

    toy = tiny_world()
    model_type, extra = FAMILIES["gemma3_text"]
    config = AutoConfig.for_model(model_type, **{**SIZES, **extra, **PEAK_MODEL})
    folders = [root / name for name in ("base", "expert1", "expert2", "expert3")]
    if all(folder.exists() for folder in folders):
        return folders
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for index, folder in enumerate(folders):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            generator = torch.Generator().manual_seed(index)
            for param in model.parameters():
                param.add_(0.01 * index * torch.randn(param.shape, generator=generator))
        model.save_pretrained(folder)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(toy.base) / name, folder / name)
    return folders


def peak_child(root: Path, candidates: int) -> None:
    """In its own process: a worker on the peak world, ``candidates`` candidates scored; prints JSON readings."""
    from evomerge.evaluate.lm_eval_scorer import TaskSet
    from evomerge.recipe.recipe import Recipe

    torch.set_num_threads(1)
    base, *experts = build_peak_world(root)
    tasks = TaskSet(names=("toy_math", "toy_lang"), include_path=str(tiny_world().tasks_dir))
    recipe = Recipe.from_plain(
        {
            "method": "ties",
            "base": str(base),
            "models": [{"model": str(e), "weight": 0.5, "density": 0.5} for e in experts],
            "dtype": "float32",
        }
    )
    worker = Worker(WorkerSpec(template=recipe, tasks=tasks))
    counted = sum(worker.memory.device_parts.values())
    loaded = psutil.Process().memory_info().rss
    for _ in range(candidates):
        worker.evaluate(recipe)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    readings = {"counted": counted, "parts": worker.memory.device_parts, "loaded": loaded, "peak": peak}
    print("PEAK " + json.dumps(readings | {"after": psutil.Process().memory_info().rss}), flush=True)


def run_peak(work: Path, candidates: int) -> list[str]:
    """Peak rows, glibc's defaults and raised thresholds, each run in a fresh process."""
    build_peak_world(work / "peak")  # once, outside the measured processes
    rows = []
    for name, extra in (("glibc defaults", {}), ("thresholds raised", RAISED_MALLOC)):
        command = [sys.executable, __file__, "--peak-child", str(work / "peak"), "--candidates", str(candidates)]
        out = subprocess.run(command, env={**os.environ, **extra}, capture_output=True, text=True, check=True).stdout
        r = json.loads(next(line for line in out.splitlines() if line.startswith("PEAK "))[5:])
        parts = ", ".join(f"{k} {v / MB:,.0f}" for k, v in r["parts"].items())
        rows.append(
            f"| {name} | {r['counted'] / MB:,.0f} ({parts}) | {r['loaded'] / MB:,.0f} | {r['after'] / MB:,.0f} "
            f"| {r['peak'] / MB:,.0f} | {r['peak'] / r['counted']:.2f} |"
        )
        print(rows[-1], flush=True)
    return rows


def write_peak(args: argparse.Namespace) -> None:
    began = time.perf_counter()
    rows = run_peak(args.work, args.candidates)
    lines = [
        "# Peak memory of a worker on a tied model with a 262,144-token vocabulary (cpu, float32)",
        "",
        f"Written by `python {' '.join(sys.argv)}` in {time.perf_counter() - began:.0f} s; not edited by hand.",
        "",
        f"- Machine: {platform.processor() or 'CPU'}, {os.cpu_count()} CPUs, torch {torch.__version__}; load "
        f"average {os.getloadavg()[0]:.1f}.",
        f"- Model: Gemma 3 text, tied, {PEAK_MODEL} (the embedding, 262,144 x 256, is most of it); a base and 3 "
        f"fine-tunes merged by TIES; {args.candidates} candidates scored on the toy tasks (batch 32), each run in "
        "its own process.",
        "- Counted: what the worker's memory check counted (its plan's parts, MB); loaded: the resident set after "
        "the worker started (model, sources, scorer); after: after the candidates; peak: the process's peak "
        "resident set (`ru_maxrss`); the ratio of the peak to what was counted.",
        "",
        "| malloc | counted (MB) | loaded (MB) | after (MB) | peak (MB) | peak / counted |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
    ]
    out = args.out or Path("results/bench_memory_peak.md")
    atomic_write_text(out, "\n".join(lines) + "\n")
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--candidates", type=int, default=300, help="evaluations per search (default 300)")
    parser.add_argument("--searches", default=",".join(SEARCHES), help=f"comma-separated, from: {', '.join(SEARCHES)}")
    parser.add_argument("--work", type=Path, default=Path("/tmp/evomerge-bench-memory"))
    parser.add_argument("--out", type=Path, default=None, help="default results/bench_memory_<device type>.md")
    parser.add_argument("--peak", action="store_true", help="peak memory on a large vocabulary against the count")
    parser.add_argument("--peak-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child is not None:
        peak_child(args.peak_child, args.candidates)
        return
    if args.peak:
        write_peak(args)
        return
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
