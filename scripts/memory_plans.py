"""A worker's memory plan for the families users merge at size, from their config.json alone: no weights, no GPU.

    python scripts/memory_plans.py            # writes results/memory_plans.md

Each model in tests/data/configs is built on torch's ``meta`` device (shapes without storage), and the plan a
PS worker makes at start (evomerge/executor/memory.py, the same code) is computed for a base and 3 experts,
merged by linear, TIES and DARE-TIES, in bfloat16 and float32, on GPUs described by their free bytes. The
reserve is one batch of ``--batch`` requests of ``--length`` tokens, every position's logits kept (loglikelihood
requests); it must fit (a worker with the default reserve would fall back to a slower tier where it does not).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from evomerge.executor.memory import (
    Shapes,
    SourcesDoNotFit,
    gpus_needed,
    plan_shapes,
    spread_options,
)
from evomerge.executor.reserve import reserve_parts
from evomerge.io.atomic import atomic_write_text
from evomerge.methods import get_method

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "data" / "configs"
GIB = 2**30
# Free memory a worker finds on each GPU once its CUDA context is up: an H100 80GB (HBM3, 79.6 GiB in all)
# leaves about 78.5 GiB, an H200 (141 GB, 139.8 GiB in all) about 139 GiB.
H100_FREE, H200_FREE = int(78.5 * GIB), int(139.0 * GIB)
SETUPS = {
    "1x H100": ["cuda:0"],
    "1x H200": ["cuda:0"],
    "2x H100": [f"cuda:{i}" for i in range(2)],
    "4x H100": [f"cuda:{i}" for i in range(4)],
    "8x H100": [f"cuda:{i}" for i in range(8)],
}
METHODS = ("linear", "ties", "dare_ties")
DTYPES = ("bfloat16", "float32")
EXPERTS = 3


def meta_shapes(folder: Path) -> Shapes:
    """The model of ``folder``'s config.json, built on the meta device: its parameters' names and shapes."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return Shapes.of_model(model)


def sources_read(method: str) -> int:
    """Source copies a worker keeps: the experts, and the base where the method reads one."""
    return EXPERTS + (1 if get_method(method).takes_base else 0)


def plan_cell(shapes: Shapes, method: str, dtype: str, setup: str, reserve: dict[str, int], host: int) -> str:
    free_each = H200_FREE if "H200" in setup else H100_FREE
    common = dict(method=get_method(method), sources=sources_read(method), experts=EXPERTS, dtype=dtype)
    free = dict.fromkeys(SETUPS[setup], free_each)
    try:
        plan = plan_shapes(shapes, **common, free=free, host_free=host, reserve=reserve)
    except SourcesDoNotFit:
        return "no tier fits"
    headroom = " / ".join(f"{(plan.headroom_on(d) - plan.shares[d]['reserve']) / GIB:.1f}" for d in plan.shares)
    return f"{plan.tier}{' + precompute' if plan.precompute else ''}; {headroom}"


def parts_row(shapes: Shapes, method: str, dtype: str, reserve: dict[str, int]) -> str:
    common = dict(method=get_method(method), sources=sources_read(method), experts=EXPERTS, dtype=dtype)
    options = spread_options(shapes, **common, devices=["cuda:0"], reserve=reserve)
    fastest = options[0][2]["cuda:0"]
    host_tier = next(parts for tier, _, parts, _ in options if tier == "host")["cuda:0"]
    cells = [
        f"{fastest['model'] / GIB:.1f}",
        f"{fastest['sources'] / GIB:.1f}",
        f"{fastest.get('precompute', 0) / GIB:.1f}",
        f"{fastest.get('temporaries', 0) / GIB:.2f}",
        f"{host_tier['streamed tensors'] / GIB:.2f}",
        f"{sum(fastest.values()) / GIB:.1f}",
    ]
    for free_each, name in ((H100_FREE, "H100"), (H200_FREE, "H200")):
        count = gpus_needed(shapes, **common, devices=["cuda:0"], reserve=reserve, free_each=free_each)
        cells.append(str(count) if count else f"> 64 {name}")
    tier = "resident + precompute" if options[0][1] else "resident"
    return f"| {method} | {dtype} | {tier} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="requests per batch the reserve holds (default 16)")
    parser.add_argument("--length", type=int, default=2048, help="tokens per request (default 2048)")
    parser.add_argument("--host-gib", type=float, default=512, help="host memory free per worker (default 512)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "memory_plans.md")
    args = parser.parse_args()
    began = time.perf_counter()
    host = int(args.host_gib * GIB)
    lines = [
        "# Memory plans at real sizes, from config.json on the meta device",
        "",
        f"Written by `python {' '.join(sys.argv)}` in {{seconds}} s; not edited by hand.",
        "",
        f"- A PS worker merging a base and {EXPERTS} experts; the plan is evomerge/executor/memory.py's, on "
        f"GPUs of {H100_FREE / GIB:.1f} GiB free (H100 80GB) or {H200_FREE / GIB:.1f} GiB (H200), "
        f"{args.host_gib:.0f} GiB of host memory free.",
        f"- Reserve: one batch of {args.batch} requests of {args.length} tokens with every position's logits "
        "(the model's dtype and a float32 log-softmax), the KV cache and one layer's activations; on several "
        "GPUs the logits sit on the head's, the KV cache with its layers.",
        "- Parts, for one GPU (GiB): the working model, the sources the method reads (linear: the 3 experts; "
        "TIES and DARE-TIES: the base and 3 task vectors), the method's precompute on a GPU (TIES: sorted "
        "magnitudes and int32 orders; DARE draws per candidate on a GPU), what loading and merging the largest "
        "tensor takes beside them (its inputs as read; TIES: its sorts), the host tier's two streamed tensors, "
        "and the fastest tier in all with the reserve. GPUs needed: the fewest H100s (H200s) that "
        "hold the fastest tier, the model placed across them as a worker places it.",
        "- Plans: the tier each setup gets and each GPU's headroom beyond the reserve (GiB), first GPU first.",
    ]
    for folder in sorted(CONFIGS.iterdir(), key=lambda f: f.name.lower()):
        shapes = meta_shapes(folder)
        entries = shapes.entries()
        lines += ["", f"## {folder.name}: {entries / 1e9:.2f}e9 parameters, vocabulary {shapes.config['vocab_size']:,}"]
        lines += [
            "",
            "| method | dtype | fastest tier | model | sources | precompute | temporaries | streamed | fastest in all "
            "| H100s needed | H200s needed |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        plans = ["", "| method | dtype | " + " | ".join(SETUPS) + " |", "| --- | --- |" + " --- |" * len(SETUPS)]
        reserves = []
        for dtype in DTYPES:
            reserve = reserve_parts(shapes.config, dtype=dtype, batch_size=args.batch, length=args.length)
            reserves.append(f"{dtype}: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in reserve.items()))
            for method in METHODS:
                lines.append(parts_row(shapes, method, dtype, reserve))
                cells = [plan_cell(shapes, method, dtype, setup, reserve, host) for setup in SETUPS]
                plans.append(f"| {method} | {dtype} | " + " | ".join(cells) + " |")
        lines += ["", f"Reserve (GiB): {'; '.join(reserves)}."]
        lines += plans
        print(f"{folder.name}: {entries / 1e9:.2f}e9 parameters", flush=True)
    text = "\n".join(lines).replace("{seconds}", f"{time.perf_counter() - began:.0f}") + "\n"
    atomic_write_text(args.out, text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
