"""`evomerge twin`: shared model, exclusive parts, router, folder: Twin-Merging from a search run or recipe."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from evomerge.errors import EvomergeError
from evomerge.io.atomic import refuse_existing
from evomerge.io.checkpoint import Checkpoint
from evomerge.search.run_folder import RunFolder
from evomerge.twin.exclusive import exclusive_factors, exclusive_vectors, kept_bytes
from evomerge.twin.export import TwinSummary, write_twin
from evomerge.twin.items import TaskItem
from evomerge.twin.model import assemble_twin, twin_class
from evomerge.twin.router import continuation_losses, pooled_features, scored_inputs, train_router
from evomerge.twin.shared import run_tasks, shared_models, write_shared


def build_twin(
    source: str | Path,
    out_dir: str | Path,
    *,
    rank: int = 1,
    svd_rank: int | None = None,
    energy: float | None = None,
    seed: int = 0,
    tasks: list[str] | None = None,
    include_path: str | None = None,
    device: str = "cpu",
    overwrite: bool = False,
) -> tuple[Path, TwinSummary]:
    """Write the Twin model of ``source`` (a PS run folder or a recipe file) to ``out_dir``.

    The router learns from ``tasks`` (by default the run's own search tasks; a recipe file needs them)."""
    from transformers import AutoTokenizer

    from evomerge.twin.items import task_items

    out_dir = Path(out_dir)
    refuse_existing(out_dir, overwrite=overwrite)
    # The family decides whether a Twin model can run at all: read it from the experts' configs before the
    # merge and the tasks (at real size, minutes and gigabytes) are spent on a model that would be refused.
    twin_class(Checkpoint.open(shared_models(source)[0]).config["model_type"])
    if tasks is None:
        if not RunFolder(source).config_path.is_file():
            raise EvomergeError(
                f"'{source}' is a recipe file, which names no tasks for the router to learn from",
                "pass --tasks NAMES (and --include-path FOLDER for tasks outside lm-eval)",
            )
        tasks, include_path = run_tasks(source)
    items = task_items(tasks, include_path=include_path)
    with tempfile.TemporaryDirectory() as scratch:
        shared_dir = Path(scratch) / "shared"
        recipe = write_shared(source, shared_dir, rank=rank, device=device)
        model, summary = twin_from_shared(
            shared_dir, recipe.model_paths, items, svd_rank=svd_rank, energy=energy, seed=seed
        )
        tokenizer = AutoTokenizer.from_pretrained(shared_dir)
        return write_twin(model, tokenizer, recipe, summary, out_dir, overwrite=overwrite), summary


def twin_from_shared(
    shared_dir: Path,
    expert_refs: list[str],
    items: list[TaskItem],
    *,
    svd_rank: int | None = None,
    energy: float | None = None,
    seed: int = 0,
) -> tuple[torch.nn.Module, TwinSummary]:
    """The Twin model over the shared model in ``shared_dir``, in memory, and what its card states."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shared = Checkpoint.open(shared_dir)
    twin_class(shared.config["model_type"])  # refuse an unsupported family before any work
    experts = [Checkpoint.open(ref) for ref in expert_refs]
    shared_tensors = {name: shared.load(name) for name in shared.names}
    expert_tensors = [{name: expert.load(name) for name in expert.names} for expert in experts]
    factors = exclusive_factors(shared_tensors, expert_tensors, rank=svd_rank, energy=energy)
    # Rank 0 keeps nothing of the experts, norms included: the Twin model is then the shared model.
    vectors = {} if 0 in (svd_rank, energy) else exclusive_vectors(shared_tensors, expert_tensors)
    inputs = scored_inputs(AutoTokenizer.from_pretrained(shared_dir), items)
    losses = torch.stack(
        [continuation_losses(AutoModelForCausalLM.from_pretrained(e.path).eval(), inputs) for e in experts], dim=1
    )
    labels = losses.argmin(dim=1)
    features = pooled_features(AutoModelForCausalLM.from_pretrained(shared_dir).eval(), inputs)
    router = train_router(features, labels, num_experts=len(experts), seed=seed)
    with torch.no_grad():
        accuracy = (router(features).argmax(dim=1) == labels).float().mean().item()
    summary = TwinSummary(
        kept_bytes=kept_bytes(factors, vectors),
        experts_bytes=sum(math.prod(e.shape(n)) * e.dtype(n).itemsize for e in experts for n in e.names),
        rank=svd_rank,
        energy=energy,
        router_tasks=sorted({item.task for item in items}),
        router_accuracy=accuracy,
    )
    return assemble_twin(shared_dir, factors, vectors, router), summary
