"""Merge speed and memory on random Llama models: a bandwidth floor, evomerge in place and to disk, and mergekit.

One run measures everything and writes ``results/bench_merge.md``: (b) in-place materialize against the
bandwidth floor (a), (c) ``evomerge merge`` against (d) ``mergekit-yaml`` on the same recipe, and their peak
RSS. The ratios are reported, not targets: at real sizes a candidate's merge takes milliseconds next to
minutes of scoring. Only the parity column (c) against (d) is a check.

    python scripts/bench_merge.py                              # CPU, float32, the five methods
    python scripts/bench_merge.py --device cuda --scale 4      # bigger models on a GPU box

A second table times (c) against (d) alone on a tied model with a large vocabulary (``--large-methods``):
Gemma 3 text's 262,144 tokens at hidden 640, whose embedding is 94% of the model.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.profiler import ProfilerActivity, profile
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils.logging import disable_progress_bar

from evomerge.dtypes import torch_dtype
from evomerge.io.atomic import atomic_write_text
from evomerge.io.checkpoint import Checkpoint
from evomerge.io.writer import ShardedWriter
from evomerge.materialize.in_place import TIERS, InPlaceMerger
from evomerge.materialize.to_disk import InputReader, merge_to_disk
from evomerge.methods import fused, get_method
from evomerge.recipe.mergekit import to_mergekit
from evomerge.recipe.recipe import Recipe

REPO = Path(__file__).resolve().parents[1]
# Source and output shards of 200 MB. mergekit's --out-shard-size is documented as parameters but
# compared against bytes (mergekit/io/tensor_writer.py), so both tools get the same byte threshold.
SHARD_BYTES = 200_000_000
SEED = 0  # the models are a function of the seed and the scale, so a cached set is reused as is
NOISE = 0.002  # the "fine-tunes" are base + N(0, NOISE^2): small task vectors, as real fine-tunes have
RECIPES = {
    "linear": {"models": [{"weight": 0.6}, {"weight": 0.4}]},
    "task_arithmetic": {"models": [{"weight": 0.7}, {"weight": 0.5}]},
    "ties": {"models": [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.7}]},
    "dare_ties": {"models": [{"weight": 1.0, "density": 0.6}, {"weight": 1.0, "density": 0.4}]},
    "slerp": {"models": [{}], "parameters": {"t": [0.2, 0.8]}},
    "dare_linear": {"models": [{"weight": 1.0, "density": 0.6}, {"weight": 1.0, "density": 0.4}]},
}
# The tied large-vocabulary model: Gemma 3 270M's vocabulary, width and attention, 2 of its 18 layers.
LARGE_VOCAB = dict(
    vocab_size=262144,
    hidden_size=640,
    intermediate_size=2048,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    tie_word_embeddings=True,
)
PARITY = 1e-5  # the float32 tolerance of tests/test_mergekit_parity.py
RANDOM = {
    "dare_ties",
    "dare_linear",
}  # mergekit draws from another generator: outputs are not comparable entry by entry


def build_models(folder: Path, *, scale: float, dtype: torch.dtype, large_vocab: bool = False) -> dict[str, Path]:
    """A random base and two noisy copies, cached: parameters grow about as scale**3 (width and depth);
    ``large_vocab``: the tied Gemma 3 text model of ``LARGE_VOCAB`` instead."""
    paths = {name: folder / name for name in ("base", "ft1", "ft2")}
    if all((path / "config.json").is_file() for path in paths.values()):
        return paths
    if large_vocab:
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma3_text", **LARGE_VOCAB)).to(dtype)
        save_noisy_copies(model, paths)
        return paths
    hidden = 64 * round(12 * scale)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=64 * round(32 * scale),
        num_hidden_layers=max(1, round(4 * scale)),
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        vocab_size=16000,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    save_noisy_copies(LlamaForCausalLM(config).to(dtype), paths)
    return paths


def save_noisy_copies(model: torch.nn.Module, paths: dict[str, Path]) -> None:
    """``model`` as the base and two copies with noise, each saved with a tokenizer."""
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    # A word-level tokenizer of four tokens: both tools copy the tokenizer files, none needs a real one.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    for i, (name, path) in enumerate(paths.items()):
        generator = torch.Generator().manual_seed(SEED + i)
        with torch.no_grad():
            for key, param in model.named_parameters():
                noise = torch.randn(param.shape, generator=generator) * NOISE if i else 0
                param.copy_(base[key] + noise)
        partial = path.with_name(f".{name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial, max_shard_size=f"{SHARD_BYTES // 10**6}MB")
        tokenizer.save_pretrained(partial)
        os.replace(partial, path)


def make_recipe(method: str, paths: dict[str, Path], dtype: str) -> Recipe:
    spec = RECIPES[method]
    experts = [paths["ft1"], paths["ft2"]]
    return Recipe.from_plain(
        {
            "method": method,
            "base": str(paths["base"]) if get_method(method).needs_base else None,
            "models": [{"model": str(path), **knobs} for path, knobs in zip(experts, spec["models"], strict=False)],
            "parameters": spec.get("parameters", {}),
            "dtype": dtype,
        }
    )


def timings(fn: Callable[[], object], *, repeats: int, device: torch.device) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn``; callers warm up first (page faults, allocator)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def top_ops(fn: Callable[[], object], *, device: torch.device, count: int = 4) -> str:
    """Run ``fn`` once more under torch.profiler and name the ops its time went to."""
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as profiler:
        fn()
        if cuda:
            torch.cuda.synchronize()
    spent = {e.key: e.self_device_time_total if cuda else e.self_cpu_time_total for e in profiler.key_averages()}
    total = sum(spent.values()) or 1
    ranked = sorted(spent.items(), key=lambda item: -item[1])[:count]
    return ", ".join(f"`{name}` {value / total:.0%}" for name, value in ranked)


def bandwidth_floor(recipe: Recipe, *, device: torch.device, dtype: torch.dtype) -> tuple[Callable[[], None], int]:
    """(a): one elementwise pass that reads every source tensor once and writes one output per name.

    ``add`` (2 inputs) and ``addcmul`` (3) are single fused kernels: N reads and one write per entry,
    the traffic no merge of these inputs can go below. Returns the pass, warmed up, and the bytes it moves.
    """
    paths = ([recipe.base] if get_method(recipe.method).needs_base else []) + recipe.model_paths
    checkpoints = [Checkpoint.open(path) for path in paths]
    groups = [[c.load(name, device=device, dtype=dtype) for c in checkpoints] for name in checkpoints[0].names]
    outputs = [torch.empty_like(group[0]) for group in groups]
    kernel = {2: torch.add, 3: torch.addcmul}[len(checkpoints)]

    def one_pass() -> None:
        for group, out in zip(groups, outputs, strict=True):
            kernel(*group, out=out)

    one_pass()
    return one_pass, sum((len(group) + 1) * group[0].nbytes for group in groups)


def in_place(recipe: Recipe, *, device: torch.device, dtype: torch.dtype) -> tuple[Callable[[], None], dict]:
    """(b): the search's hot path, one merger built once; returns ``materialize`` (warmed up) and what its
    first call cost and left behind."""
    model = AutoModelForCausalLM.from_pretrained(recipe.base or recipe.model_paths[0], dtype=dtype).to(device)
    merger = InPlaceMerger(model=model, template=recipe)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # Warm-up: the first call faults the parameters' pages in, computes what the method declares as its
    # precompute (TIES: one sort per task vector) and compiles the fused kernels (TIES, DARE-TIES), once per search.
    first = timings(lambda: merger.materialize(recipe), repeats=1, device=device)[0]
    # It merged eagerly while the fused kernels compile in the background (methods/fused.py): (b) times them.
    building = timings(fused.wait_for_kernels, repeats=1, device=device)[0]
    kept = sum(t.nbytes for known in merger._precomputed.values() for t in known.values() if t is not None)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return (lambda: merger.materialize(recipe)), {
        "b_first": first,
        "b_build": building,
        "kept": kept,
        "peak_device": peak,
    }


def tier_seconds(recipe: Recipe, *, device: torch.device, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """Seconds per candidate in each memory tier (materialize/in_place.py): the median of ``repeats`` calls
    after a warm-up. Resident keeps the method's precompute, as a worker does where it fits."""
    seconds = {}
    for tier in TIERS:
        model = AutoModelForCausalLM.from_pretrained(recipe.base or recipe.model_paths[0], dtype=dtype).to(device)
        candidate = functools.partial(InPlaceMerger(model=model, template=recipe, tier=tier).materialize, recipe)
        candidate()
        seconds[tier] = statistics.median(timings(candidate, repeats=repeats, device=device))
    return seconds


def floor_and_in_place(recipe: Recipe, *, device: torch.device, dtype: torch.dtype, rounds: int) -> dict:
    """(a) and (b) in alternation, one call of each per round, so that both meet the same machine (on a
    shared one, other work comes and goes in bursts): each figure is the median over the rounds, b/a the
    median of the rounds' ratios."""
    materialize, row = in_place(recipe, device=device, dtype=dtype)  # first: its peak device memory is its own
    floor, moved = bandwidth_floor(recipe, device=device, dtype=dtype)
    pairs = [
        (timings(floor, repeats=1, device=device)[0], timings(materialize, repeats=1, device=device)[0])
        for _ in range(rounds)
    ]
    row["a"], row["b"] = (statistics.median(times) for times in zip(*pairs, strict=True))
    row["ratio"] = statistics.median(b / a for a, b in pairs)
    row["gbps"] = moved / row["a"] / 1e9
    row["ops"] = top_ops(materialize, device=device)
    return row


# Each tool's console script (`from X import main; sys.exit(main())`) with a clock read once the
# imports are done, so one run splits into start-up and merge.
CONSOLE = (
    "import sys, time; start = time.perf_counter(); import {modules}; from {entry} import main; "
    "print(f'imports done after {{time.perf_counter() - start:.3f}} s', file=sys.stderr, flush=True); sys.exit(main())"
)
# ... run from this small interpreter, not from the benchmark: on Linux a child's ru_maxrss starts at
# the RSS of the process it was forked from (the high-water mark survives fork and exec), which would
# be the benchmark with its resident tensors.
TIMED_CHILD = (
    "import resource, subprocess, sys, time; start = time.perf_counter(); code = subprocess.run(sys.argv[2:]).returncode; "
    "open(sys.argv[1], 'w').write(f'{time.perf_counter() - start} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}'); "
    "sys.exit(code)"
)


def console(script: str, modules: str, entry: str) -> list[str]:
    """The command that runs ``script``'s entry point as its console script does, under its own Python."""
    first = Path(script).read_bytes()[:200].split(b"\n")[0].decode(errors="replace")
    if not (first.startswith("#!") and "python" in first):
        return [script]
    return [*shlex.split(first[2:]), "-c", CONSOLE.format(modules=modules, entry=entry)]


def run_child(command: list[str], log: Path) -> tuple[float, float, int]:
    """Wall seconds, start-up seconds (nan if not reported) and peak RSS (bytes) of one fresh process."""
    usage = log.with_suffix(".usage")
    with log.open("w") as out:
        code = subprocess.run(
            [sys.executable, "-c", TIMED_CHILD, str(usage), *command], stdout=out, stderr=out
        ).returncode
    if code:
        raise RuntimeError(f"{shlex.join(command)} exited with {code}; its output is in {log}")
    seconds, maxrss_kib = usage.read_text().split()
    startup = re.search(r"imports done after ([0-9.]+) s", log.read_text())
    return float(seconds), float(startup.group(1)) if startup else math.nan, int(maxrss_kib) * 1024


def to_disk_phases(recipe: Recipe, out: Path, *, device: str, dtype: str) -> dict[str, float]:
    """``merge_to_disk`` in this process under cProfile, split into reading, merging and writing."""
    profiler = cProfile.Profile()
    profiler.runcall(
        merge_to_disk, recipe, out, device=device, dtype=dtype, overwrite=True, max_shard_bytes=SHARD_BYTES
    )
    profiler.create_stats()

    def cumulative(fn: Callable) -> float:
        code = fn.__code__
        return profiler.stats.get((code.co_filename, code.co_firstlineno, code.co_name), (0, 0, 0, 0.0))[3]

    total = cumulative(merge_to_disk)
    phases = {
        "read (load, stack, task vectors)": cumulative(InputReader.read),
        "merge (method fn)": cumulative(get_method(recipe.method).fn),
        "write (shards, index)": cumulative(ShardedWriter.add) + cumulative(ShardedWriter.finish),
    }
    return {**phases, "other": total - sum(phases.values()), "total": total}


def max_abs_diff(ours: Path, theirs: Path) -> float:
    a, b = Checkpoint.open(ours), Checkpoint.open(theirs)
    if sorted(a.names) != sorted(b.names):
        return math.inf
    return max((a.load(n).float() - b.load(n).float()).abs().max().item() for n in a.names)


def find_mergekit(given: str | None) -> str | None:
    if given:
        return given
    for candidate in (REPO / ".venv-mergekit/bin/mergekit-yaml", Path("/work/mkvenv/bin/mergekit-yaml")):
        if candidate.is_file():
            return str(candidate)
    return shutil.which("mergekit-yaml")


def measure(method: str, paths: dict[str, Path], args: argparse.Namespace, tools: dict) -> dict:
    device, dtype = torch.device(args.device), torch_dtype(args.dtype)
    recipe = make_recipe(method, paths, args.dtype)
    row = floor_and_in_place(recipe, device=device, dtype=dtype, rounds=args.repeats)
    row["tiers"] = tier_seconds(recipe, device=device, dtype=dtype, repeats=3)
    runs = args.work / "runs" / method
    row |= whole_process(method, recipe, runs, args, tools)
    row["phases"] = to_disk_phases(recipe, runs / "profiled", device=args.device, dtype=args.dtype)
    shutil.rmtree(runs / "profiled")
    return row


def whole_process(method: str, recipe: Recipe, runs: Path, args: argparse.Namespace, tools: dict) -> dict:
    """(c) and (d) on ``recipe``: wall and start-up seconds, peak RSS, and the largest difference."""
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    (runs / "recipe.yaml").write_text(recipe.to_yaml())
    (runs / "mergekit.yml").write_text(yaml.safe_dump(to_mergekit(recipe), sort_keys=False))
    row = {}
    commands = {
        "c": [*tools["evomerge"], "merge", str(runs / "recipe.yaml"), str(runs / "evomerge"), *tools["evomerge_flags"]]
    }
    if tools["mergekit"]:
        commands["d"] = [
            *tools["mergekit"],
            str(runs / "mergekit.yml"),
            str(runs / "mergekit"),
            *tools["mergekit_flags"],
        ]
    # (c) and (d) take turns, --runs times each, so a burst of other work on the machine slows both; each
    # figure is the median of its runs, d/c the median of the turns' ratios, peak RSS the highest.
    samples: dict[str, list[tuple[float, float, int]]] = {key: [] for key in commands}
    for _ in range(args.runs):
        for key, command in commands.items():
            samples[key].append(run_child(command, runs / f"{key}.log"))
    for key, runs_of_key in samples.items():
        walls, startups, peaks = zip(*runs_of_key, strict=True)
        row[key], row[f"start_{key}"], row[f"rss_{key}"] = (
            statistics.median(walls),
            statistics.median(startups),
            max(peaks),
        )
    if "d" in samples:
        row["speedup"] = statistics.median(d[0] / c[0] for c, d in zip(samples["c"], samples["d"], strict=True))
    if tools["mergekit"]:
        row["diff"] = None if method in RANDOM else max_abs_diff(runs / "evomerge", runs / "mergekit")
    return row


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def report(rows: dict[str, dict], dtype: str) -> list[str]:
    lines = [
        "| method | (a) floor | (b) in place | b/a | (b) first call | (c) evomerge merge | (d) mergekit-yaml | d/c | d/c after start-up "
        "| peak RSS (c) | peak RSS (d) | max abs(c − d) |",
        "| --- " * 12 + "|",
    ]
    verdicts = []
    for method, r in rows.items():
        peak = f", {r['peak_device'] / 2**30:.1f} GiB peak on device" if r["peak_device"] else ""
        b_ratio = r["ratio"]
        cells = [
            method,
            f"{r['a'] * 1e3:.0f} ms, {r['gbps']:.1f} GB/s",
            f"{r['b'] * 1e3:.0f} ms{peak}",
            f"{b_ratio:.1f}×",
            f"{r['b_first']:.2f} s"
            + (f" (kernels built {r['b_build']:.0f} s later)" if r["b_build"] >= 0.5 else "")
            + (f", keeps {mb(r['kept'])}" if r["kept"] else ""),
        ]
        cells.append(f"{r['c']:.1f} s ({r['start_c']:.1f} s start-up)")
        said = [f"(b) is {b_ratio:.1f}× (a)"]
        if b_ratio > 2:
            said[-1] += f": {r['b'] - r['a']:.2f} s beyond moving the bytes, in {r['ops']}"
            if method in RANDOM and r["kept"]:
                # DARE reads its kept draws (a float32 word per entry per model) every candidate, besides the weights (a) counts.
                floor = r["a"] + r["kept"] / (r["gbps"] * 1e9)
                said[-1] += (
                    f". It also reads its kept draws ({mb(r['kept'])}) every candidate: (a) plus those bytes at (a)'s "
                    f"rate is {1000 * floor:.0f} ms, and (b) is {r['b'] / floor:.1f}× that"
                )
        if "d" in r:
            speed, engine = r["speedup"], (r["d"] - r["start_d"]) / (r["c"] - r["start_c"])
            diff = "random method" if r["diff"] is None else f"{r['diff']:.1e}"
            cells += [f"{r['d']:.1f} s ({r['start_d']:.1f} s start-up)", f"{speed:.2f}×", f"{engine:.2f}×"]
            cells += [mb(r["rss_c"]), mb(r["rss_d"]), diff]
            said.append(f"(d)/(c) is {speed:.2f}×")
            if speed < 3:
                merge_share = r["phases"]["merge (method fn)"] / r["phases"]["total"]
                said[-1] += (
                    f": start-up is {r['start_c']:.1f} of (c)'s {r['c']:.1f} s and {r['start_d']:.1f} of (d)'s "
                    f"{r['d']:.1f} s; after start-up (d)/(c) is {engine:.2f}×, and the method function is "
                    f"{merge_share:.0%} of (c)'s merge"
                )
            said.append(f"peak RSS (c) {mb(r['rss_c'])} vs (d) {mb(r['rss_d'])}")
            if r["diff"] is not None and dtype == "float32":
                verdict = "holds" if r["diff"] <= PARITY else "FAILS"
                said.append(f"max abs(c − d) ≤ {PARITY:g} (tests/test_mergekit_parity.py) {verdict} at {r['diff']:.1e}")
        else:
            cells += ["skipped: no mergekit-yaml", "–", "–", mb(r["rss_c"]), "–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
        verdicts.append(f"- **{method}**: " + "; ".join(said) + ".")
    lines += [
        "",
        "## What the ratios say (reported, not targets)",
        "",
        *verdicts,
        "",
    ]
    lines += [
        "## Seconds per candidate in each memory tier",
        "",
        "`InPlaceMerger(tier=...).materialize`, the median of 3 calls after a warm-up: sources resident on the "
        "device (with the method's precompute), in host memory (pinned and streamed a tensor ahead on a GPU; on a "
        "CPU the same memory, so no copy), or read from the page cache per candidate.",
        "",
        "| method | " + " | ".join(TIERS) + " |",
        "| --- " * (len(TIERS) + 1) + "|",
        *[f"| {m} | " + " | ".join(f"{r['tiers'][t] * 1e3:.0f} ms" for t in TIERS) + " |" for m, r in rows.items()],
        "",
        "## Where (c)'s time goes after start-up",
        "",
    ]
    lines.append("`merge_to_disk` once more in this process under cProfile, cumulative seconds per phase.")
    names = list(next(iter(rows.values()))["phases"])
    lines += ["", "| method | " + " | ".join(names) + " |", "| --- " * (len(names) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join(f"{r['phases'][n]:.2f} s" for n in names) + " |" for m, r in rows.items()]
    return lines


def large_vocab_report(rows: dict[str, dict], paths: dict[str, Path], args: argparse.Namespace) -> list[str]:
    reference = Checkpoint.open(paths["base"])
    parameters = sum(math.prod(reference.shape(name)) for name in reference.names)
    lines = [
        "## A tied model with a large vocabulary",
        "",
        f"(c) against (d) as above, {args.runs} runs each, on 3 random `Gemma3ForCausalLM` (text; vocab "
        f"{LARGE_VOCAB['vocab_size']:,}, hidden {LARGE_VOCAB['hidden_size']}, intermediate "
        f"{LARGE_VOCAB['intermediate_size']}, {LARGE_VOCAB['num_hidden_layers']} layers, tied embeddings: the "
        f"embedding is {math.prod(reference.shape('model.embed_tokens.weight')) / parameters:.0%} of its "
        f"{parameters / 1e6:.0f} M parameters), {mb(parameters * torch_dtype(args.dtype).itemsize)} each in "
        f"{args.dtype}; fine-tunes = base + N(0, {NOISE}²).",
        "",
        "| method | (c) evomerge merge | (d) mergekit-yaml | d/c | d/c after start-up | peak RSS (c) | peak RSS (d) "
        "| max abs(c − d) |",
        "| --- " * 8 + "|",
    ]
    for method, r in rows.items():
        cells = [method, f"{r['c']:.1f} s ({r['start_c']:.1f} s start-up)"]
        if "d" in r:
            engine = (r["d"] - r["start_d"]) / (r["c"] - r["start_c"])
            diff = "random method" if r["diff"] is None else f"{r['diff']:.1e}"
            cells += [f"{r['d']:.1f} s ({r['start_d']:.1f} s start-up)", f"{r['speedup']:.2f}×", f"{engine:.2f}×"]
            cells += [mb(r["rss_c"]), mb(r["rss_d"]), diff]
        else:
            cells += ["skipped: no mergekit-yaml", "–", "–", mb(r["rss_c"]), "–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--methods", default=",".join(RECIPES), help=f"comma-separated, from {', '.join(RECIPES)}")
    parser.add_argument(
        "--large-methods",
        default="slerp,dare_ties,dare_linear",
        help="methods timed on the tied large-vocabulary model, (c) against (d) only ('' for none)",
    )
    parser.add_argument("--repeats", type=int, default=9, help="rounds of (a) and (b) in turn, after one warm-up")
    parser.add_argument("--runs", type=int, default=5, help="fresh-process runs of (c) and (d), taking turns")
    parser.add_argument("--scale", type=float, default=1.0, help="model width and depth multiplier (default 1)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/evomerge-bench"), help="model cache and outputs")
    parser.add_argument("--mergekit-yaml", default=None, help="mergekit-yaml to compare with (default: found)")
    parser.add_argument("--out", type=Path, default=REPO / "results/bench_merge.md")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch here and in (c) and (d) (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads:
        # On a shared machine an OpenMP thread that loses its core stalls every kernel's barrier; fewer
        # threads than cores keeps the ratios meaningful. The children read these at start-up.
        torch.set_num_threads(args.threads)
        os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    disable_progress_bar()
    load_before, started = os.getloadavg(), time.perf_counter()
    dtype = torch_dtype(args.dtype)
    paths = build_models(args.work / f"models-x{args.scale:g}-{args.dtype}-seed{SEED}", scale=args.scale, dtype=dtype)
    mergekit = find_mergekit(args.mergekit_yaml)
    shard_mib = f"{SHARD_BYTES / 2**20:.4f}"  # the same byte threshold as mergekit's
    evomerge = shutil.which("evomerge", path=str(Path(sys.executable).parent)) or shutil.which("evomerge")
    tools = {
        "evomerge": console(
            evomerge, "evomerge.cli, evomerge.materialize.to_disk, evomerge.recipe.recipe", "evomerge.cli"
        ),
        "evomerge_flags": f"--device {args.device} --dtype {args.dtype} --overwrite --shard-size-mb {shard_mib}".split(),
        "mergekit": mergekit and console(mergekit, "mergekit.scripts.run_yaml", "mergekit.scripts.run_yaml"),
        "mergekit_flags": f"--out-shard-size {SHARD_BYTES} --no-lazy-unpickle --copy-tokenizer --quiet".split()
        + (["--cuda"] if args.device == "cuda" else []),
    }
    rows = {}
    for method in args.methods.split(","):
        rows[method] = measure(method, paths, args, tools)
        print(f"{method}: " + ", ".join(f"{k}={v}" for k, v in rows[method].items() if k != "phases"), flush=True)
    large_paths = build_models(
        args.work / f"models-gemma3-262k-{args.dtype}-seed{SEED}", scale=1, dtype=dtype, large_vocab=True
    )
    large = {}
    for method in filter(None, args.large_methods.split(",")):
        recipe = make_recipe(method, large_paths, args.dtype)
        large[method] = whole_process(method, recipe, args.work / "runs" / f"large-{method}", args, tools)
        print(f"large vocabulary, {method}: " + ", ".join(f"{k}={v}" for k, v in large[method].items()), flush=True)

    config = LlamaConfig.from_pretrained(paths["base"])
    reference = Checkpoint.open(paths["base"])
    parameters = sum(math.prod(reference.shape(name)) for name in reference.names)
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.machine())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = f", GPU {torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    load = ["/".join(f"{x:.1f}" for x in loads) for loads in (load_before, os.getloadavg())]
    header = [
        "# Merge benchmark: bandwidth floor, evomerge in place and to disk, mergekit",
        "",
        f"Written by `python {shlex.join(sys.argv)}` in {time.perf_counter() - started:.0f} s on "
        f"{time.strftime('%Y-%m-%d %H:%M')}; not edited by hand.",
        "",
        f"- Machine: {os.cpu_count()} CPUs ({cpu}), {memory:.0f} GiB RAM, "
        f"Python {platform.python_version()}, torch {torch.__version__} (threads: {torch.get_num_threads()}){gpu}; "
        f"device `{args.device}`, dtype `{args.dtype}`.",
        f"- Load average (1/5/15 min) before: {load[0]}, after: {load[1]}. Other processes shared this machine, "
        "so the times are slower and noisier than on an idle one.",
        f"- Models: 3 random `LlamaForCausalLM` (hidden {config.hidden_size}, intermediate {config.intermediate_size}, "
        f"{config.num_hidden_layers} layers, vocab {config.vocab_size}, untied embeddings), {parameters / 1e6:.0f} M "
        f"parameters = {mb(parameters * dtype.itemsize)} each in {args.dtype}, safetensors in {mb(SHARD_BYTES)} "
        f"shards; fine-tunes = base + N(0, {NOISE}²). All reads hit the page cache.",
        "- (a): one fused `add` (2 inputs) or `addcmul` (3 inputs) per tensor over sources resident on the device, "
        "N reads + 1 write per entry: the least any merge moves. (b): `InPlaceMerger.materialize` into a loaded "
        "model, sources resident (the first call, which also computes what the method declares as its precompute and "
        "merges eagerly while TIES' and DARE-TIES' fused kernels compile in the background, is timed apart, with how "
        "much later the kernels were built, with the memory that precompute keeps on the "
        f"device beside the resident sources). After a warm-up, (a) and (b) run in turn for {args.repeats} rounds, "
        "so both meet the same load: (a) and (b) are the medians, b/a the median of the rounds' ratios. One more "
        "call of (b) runs under torch.profiler and names the ops below.",
        f"- (c): `{shlex.join(['evomerge', 'merge', 'RECIPE', 'OUT', *tools['evomerge_flags']])}`. (d): "
        f"`{shlex.join(['mergekit-yaml', 'CONFIG', 'OUT', *tools['mergekit_flags']])}` ({mergekit or 'not found'}) "
        "on `to_mergekit(recipe)`. Each runs its console script's entry point in a fresh process that notes when its "
        "imports are done (start-up); wall time includes start-up; peak RSS is that process's own `ru_maxrss`. "
        f"(c) and (d) take turns, {args.runs} runs each: times are medians, d/c the median of the turns' ratios, "
        "peak RSS the highest.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tail = ["", *large_vocab_report(large, large_paths, args)] if large else []
    atomic_write_text(args.out, "\n".join(header + report(rows, args.dtype) + tail) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
