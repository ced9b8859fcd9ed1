"""The host memory tier at a size where its streaming matters: bytes page-locked against bytes counted, and
seconds per candidate against the copy floor and the resident tier.

    python scripts/bench_host_tier.py --device cuda [--hidden 2048 --layers 8] [--out FILE.md]

Models: three random Llamas (a base and two noisy copies; hidden 2048, 8 layers: 0.54 B parameters, 1.1 GB
in bfloat16 each), built on the device and saved to --work. task_arithmetic over them: the host tier keeps
the base and two task vectors (three model copies) in one page-locked buffer and copies all of it to the GPU
per candidate, a tensor ahead of the merge on a side stream (materialize/in_place.py). The copy floor is
one copy of that buffer to the device; the host tier's time over it shows how much of the merging hides
under the copies. An eager method, so no kernel compile enters the timings.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.executor.memory import resident_bytes
from evomerge.materialize.in_place import InPlaceMerger
from evomerge.recipe.recipe import Recipe

NOISE = 0.01


def build(folder: Path, *, hidden: int, layers: int, device: torch.device) -> list[Path]:
    """A base and two fine-tunes (base plus noise) in bfloat16, made on ``device`` (fast on a GPU)."""
    paths = [folder / name for name in ("base", "ft1", "ft2")]
    if all((path / "config.json").is_file() for path in paths):
        return paths
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=64 * round(hidden * 11 / 4 / 64),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        vocab_size=32000,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    for i, path in enumerate(paths):
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(base[name] + (torch.randn_like(param) * NOISE if i else 0))
        shutil.rmtree(path, ignore_errors=True)
        model.save_pretrained(path)
    return paths


def seconds(call, *, device: torch.device, repeats: int) -> float:
    """The median of ``repeats`` timed calls after one warm-up, the device synchronized around each."""
    call()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(tier: str, recipe: Recipe, *, device: torch.device, repeats: int) -> dict:
    """Seconds per candidate in ``tier``; for the host tier also its buffer's bytes, whether they are
    page-locked, and the copy floor (the whole buffer to the device at once)."""
    model = LlamaForCausalLM.from_pretrained(recipe.base, dtype=torch.bfloat16).to(device)
    merger = InPlaceMerger(model=model, template=recipe, tier=tier)
    row = {tier: seconds(lambda: merger.materialize(recipe), device=device, repeats=repeats)}
    if tier == "host":
        buffer = merger._host
        on_device = torch.empty_like(buffer.tensor, device=device)
        row["floor"] = seconds(lambda: on_device.copy_(buffer.tensor, non_blocking=True), device=device, repeats=3)
        row["buffer"], row["pinned"] = buffer.nbytes, device.type == "cuda" and buffer.tensor.is_pinned()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/evomerge-host-tier"))
    parser.add_argument("--out", type=Path, default=None, help="a markdown table (default: printed only)")
    args = parser.parse_args()
    device = torch.device(args.device)
    paths = build(args.work / f"h{args.hidden}-l{args.layers}", hidden=args.hidden, layers=args.layers, device=device)
    recipe = Recipe.from_plain(
        {
            "method": "task_arithmetic",
            "base": str(paths[0]),
            "models": [{"model": str(paths[1]), "weight": 0.7}, {"model": str(paths[2]), "weight": 0.5}],
            "dtype": "bfloat16",
        }
    )
    total, copies = resident_bytes(recipe, "bfloat16")
    counted = total - total // copies  # the memory plan's host-tier sources (executor/memory.py)

    row = {
        **measure("host", recipe, device=device, repeats=args.repeats),
        **measure("resident", recipe, device=device, repeats=args.repeats),
    }

    parameters = total // copies // 2
    gib = 2**30
    table = [
        "| model | sources counted | host buffer | page-locked | copy floor | host tier | host / floor | resident tier |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| 3 x {parameters / 1e9:.2f} B bf16, task_arithmetic | {counted / gib:.2f} GiB | {row['buffer'] / gib:.2f} GiB "
        f"| {'yes' if row['pinned'] else 'no'} | {row['floor'] * 1e3:.0f} ms ({row['buffer'] / row['floor'] / 1e9:.1f} GB/s) "
        f"| {row['host'] * 1e3:.0f} ms | {row['host'] / row['floor']:.2f} | {row['resident'] * 1e3:.0f} ms |",
    ]
    command = f"python scripts/bench_host_tier.py --device {args.device} --hidden {args.hidden} --layers {args.layers}"
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join([f"# The host memory tier on {args.device}", "", f"`{command}`", "", *table, ""]))
    print("\n".join(table))
    print(
        f"host tier: {row['buffer'] / gib:.2f} GiB in one buffer ({counted / gib:.2f} GiB counted, "
        f"{'page-locked' if row['pinned'] else 'not page-locked'}); {row['host'] * 1e3:.0f} ms per candidate against "
        f"a {row['floor'] * 1e3:.0f} ms copy floor and {row['resident'] * 1e3:.0f} ms resident",
        flush=True,
    )


if __name__ == "__main__":
    main()
