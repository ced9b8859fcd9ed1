"""How evomerge reads safetensors tensors into its reused buffers, against safetensors' own API.

    python scripts/bench_reads.py --gib 2 --repeats 3

A merge to disk reads each source tensor into one reused buffer (``materialize/to_disk.py``). Three ways to
fill it, each timed in a fresh process over every tensor of a folder of synthetic shards (Llama-7B-sized
bfloat16 MLP matrices, 4096 x 11008, 86 MiB each), with the page cache warm:

- ``read_into``: evomerge's ``Checkpoint.read_into``, a positioned read (``os.preadv``) of the tensor's bytes
  straight into the buffer, at offsets from the shard's JSON header;
- ``safe_open``: ``safe_open(...).get_tensor(name)``, then ``buffer.copy_``: safetensors' own API;
- ``load_file``: ``safetensors.torch.load_file(shard)``, then ``buffer.copy_`` per tensor.

Reports each way's median wall time and its peak resident set (``VmHWM``). Writes results/bench_reads.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from evomerge.io.atomic import atomic_write_text
from evomerge.io.checkpoint import Checkpoint

SHAPE = (4096, 11008)  # Llama-2-7B's MLP matrices
WAYS = ("read_into", "safe_open", "load_file")


def write_shards(folder: Path, gib: float, per_shard: int = 8) -> list[str]:
    """Synthetic shards of bfloat16 matrices, about ``gib`` GiB in all; returns the tensor names."""
    count = max(1, round(gib * 2**30 / (SHAPE[0] * SHAPE[1] * 2)))
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(count)]
    if (folder / "done").exists():
        return names
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    shards = [names[i : i + per_shard] for i in range(0, count, per_shard)]
    index = {}
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: torch.randn(SHAPE, generator=generator).to(torch.bfloat16) for n in shard}, folder / file)
        index |= {n: file for n in shard}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": count}))
    (folder / "done").write_text("")
    return names


def read_all(folder: Path, way: str) -> dict[str, float]:
    """Run in a fresh process: fill one buffer with every tensor, one after another, the given way."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    buffer = torch.empty(SHAPE, dtype=torch.bfloat16)
    checksum = 0.0
    began = time.perf_counter()
    if way == "read_into":
        checkpoint = Checkpoint.open(folder)
        for name in index:
            checksum += float(checkpoint.read_into(name, buffer)[0, 0])
    elif way == "safe_open":
        for file in sorted(set(index.values())):
            with safe_open(str(folder / file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    checksum += float(buffer.copy_(handle.get_tensor(name))[0, 0])
    else:
        for file in sorted(set(index.values())):
            for tensor in load_file(folder / file).values():
                checksum += float(buffer.copy_(tensor)[0, 0])
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "peak_mib": peak_rss_mib(), "checksum": checksum}


def peak_rss_mib() -> float:
    """This process's peak resident set: VmHWM, which starts afresh at exec (ru_maxrss carries the parent's
    peak across fork and exec, here the shard writer's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (this script reads Linux's)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=2.0, help="size of the synthetic shards in all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/evomerge-bench-reads"))
    parser.add_argument("--out", type=Path, default=Path("results/bench_reads.md"))
    parser.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.work / f"shards-{args.gib:g}gib"
    if args.child:
        print(json.dumps(read_all(folder, args.child)))
        return
    names = write_shards(folder, args.gib)
    for file in folder.glob("*.safetensors"):
        file.read_bytes()  # warm the page cache: every way then reads from memory, not the disk
    runs: dict[str, list[dict]] = {way: [] for way in WAYS}
    for _ in range(args.repeats):
        for way in WAYS:  # in turns, so a slow spell of the shared machine hits every way alike
            child = [sys.executable, __file__, "--gib", str(args.gib), "--work", str(args.work), "--child", way]
            runs[way].append(json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout))
    checksums = {run["checksum"] for group in runs.values() for run in group}
    assert len(checksums) == 1, f"the ways read different bytes: {checksums}"
    size_mib = len(names) * SHAPE[0] * SHAPE[1] * 2 / 2**20
    lines = [
        "# Reading safetensors into a reused buffer: evomerge's positioned reads vs safetensors' API",
        "",
        f"Command: `{shlex.join(['python', *sys.argv])}`. Synthetic shards, not a world: {len(names)} bfloat16 "
        f"matrices of {SHAPE[0]} x {SHAPE[1]} ({size_mib:,.0f} MiB in 8-matrix shards), page cache warm; "
        f"{args.repeats} fresh processes per way, run in turns; the median wall time, the largest peak RSS.",
        "",
        "| way | wall (median) | GiB/s | peak RSS |",
        "| --- | --- | --- | --- |",
    ]
    for way, group in runs.items():
        wall = statistics.median(run["seconds"] for run in group)
        peak = max(run["peak_mib"] for run in group)
        lines.append(f"| `{way}` | {wall:.2f} s | {size_mib / 1024 / wall:.2f} | {peak:,.0f} MiB |")
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
