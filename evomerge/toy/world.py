"""Build the toy world once per (size, seed, builder version) and find it again in the cache."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.errors import EvomergeError
from evomerge.toy.curriculum import build_curriculum
from evomerge.toy.models import save_model, tensor_digest, train_models
from evomerge.toy.spec import SPECS, TORCH_THREADS
from evomerge.toy.tasks import write_task
from evomerge.toy.tokenizer import build_tokenizer

# Bump whenever a change to the builder changes what it writes: old cache folders are then ignored.
BUILDER_VERSION = 4
COMPLETE_MARKER = "BUILD_COMPLETE.json"


@dataclass(frozen=True)
class ToyWorld:
    """Paths of one built toy world. ``tasks`` maps a skill ("lang", "math", "combined") to the lm-eval
    task name found under ``tasks_dir``; ``holdout_tasks`` holds disjoint items of the same skills."""

    root: Path
    base: Path
    experts: dict[str, Path]
    incompatible: dict[str, Path]
    tasks_dir: Path
    tasks: dict[str, str]
    holdout_tasks: dict[str, str]
    digests: dict[str, str]
    build_seconds: dict[str, float]


def default_root() -> Path:
    cache = os.environ.get("EVOMERGE_CACHE")
    return (Path(cache) if cache else Path.home() / ".cache" / "evomerge") / "toy"


def build_world(size: str = "full", seed: int = 0, root: str | Path | None = None, force: bool = False) -> ToyWorld:
    """Return the toy world of this size and seed, building it first unless a complete copy is cached.

    The build writes into a temporary folder renamed into place when complete, so a killed build never
    leaves a folder that looks complete; a lock file makes a second process wait and then reuse the
    first one's world instead of building its own.
    """
    if size not in SPECS:
        raise EvomergeError(f"unknown toy world size {size!r}", f"use one of {sorted(SPECS)}")
    root = Path(root).expanduser().resolve() if root is not None else default_root()
    final = root / f"{size}-seed{seed}-v{BUILDER_VERSION}"
    build_once(final, force=force, build=lambda staging: _build_into(staging, final, size, seed))
    return load_world(final)


def build_once(final: Path, *, force: bool, build: Callable[[Path], None]) -> None:
    """Have ``final`` hold a complete build: ``build(staging)`` writes one into a temporary folder that is
    renamed into place when complete, under a lock, unless a complete one (its marker) is there already."""
    if not force and (final / COMPLETE_MARKER).exists():
        return
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f"{final.name}.lock"):
        if not force and (final / COMPLETE_MARKER).exists():
            return
        for stale in root.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = root / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            build(staging)
            if final.exists():
                retired = root / f".{final.name}.tmp-retired-{uuid.uuid4().hex[:8]}"
                final.rename(retired)
                shutil.rmtree(retired)
            staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def load_world(folder: Path) -> ToyWorld:
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    models = folder / "models"
    return ToyWorld(
        root=folder,
        base=models / "base",
        experts={name: models / name for name in ("lang", "math")},
        incompatible={name: models / f"incompatible_{name}" for name in ("hidden", "layers")},
        tasks_dir=folder / "tasks",
        tasks=marker["tasks"],
        holdout_tasks=marker["holdout_tasks"],
        digests=marker["digests"],
        build_seconds=marker["seconds"],
    )


@contextmanager
def _exclusive_lock(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_into(staging: Path, final: Path, size: str, seed: int) -> None:
    start = time.perf_counter()
    spec = SPECS[size]
    threads = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    try:
        tokenizer = build_tokenizer()
        curriculum = build_curriculum(spec, seed)
        trained = train_models(spec, seed, tokenizer, curriculum)
    finally:
        torch.set_num_threads(threads)
    models = {"base": trained.base, **trained.experts}
    models.update({f"incompatible_{name}": model for name, model in trained.incompatible.items()})
    digests = {}
    for name, model in models.items():
        save_model(model, tokenizer, staging / "models" / name)
        digests[name] = tensor_digest(staging / "models" / name)
    for item_set in [*curriculum.tasks.values(), *curriculum.holdout_tasks.values()]:
        write_task(item_set, staging / "tasks", final / "tasks")
    marker = {
        "builder_version": BUILDER_VERSION,
        "size": size,
        "seed": seed,
        "spec": dataclasses.asdict(spec),
        "tasks": {skill: items.name for skill, items in curriculum.tasks.items()},
        "holdout_tasks": {skill: items.name for skill, items in curriculum.holdout_tasks.items()},
        "digests": digests,
        "final_losses": trained.final_losses,
        "seconds": {**trained.seconds, "total": time.perf_counter() - start},
    }
    # Written last: its presence is what says the folder is complete.
    (staging / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2))
