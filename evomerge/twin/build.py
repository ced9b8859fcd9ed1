"""`evomerge twin`: shared model, exclusive parts, router, folder: Twin-Merging from a search run or recipe."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from evomerge.errors import EvomergeError
from evomerge.io.atomic import refuse_existing
from evomerge.io.checkpoint import Checkpoint
from evomerge.materialize.to_disk import resolve_device
from evomerge.search.run_folder import RunFolder
from evomerge.twin.exclusive import exclusive_parts, kept_bytes
from evomerge.twin.export import TwinSummary, write_twin
from evomerge.twin.items import TaskItem
from evomerge.twin.model import assemble_twin, twin_class
from evomerge.twin.router import ROUTER_SIZE, continuation_losses, pooled_features, scored_inputs, train_router
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
            shared_dir, recipe.model_paths, items, svd_rank=svd_rank, energy=energy, seed=seed, device=device
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
    device: str = "cpu",
) -> tuple[torch.nn.Module, TwinSummary]:
    """The Twin model over the shared model in ``shared_dir``, on ``device``, and what its card states.

    Whole models are loaded one at a time: the exclusive parts are read tensor by tensor, each
    expert is loaded alone to label the router's items, then the Twin model (the shared weights and the
    parts) is assembled, and reads its own features as the shared model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shared = Checkpoint.open(shared_dir)
    twin_class(shared.config["model_type"])  # refuse an unsupported family before any work
    experts = [Checkpoint.open(ref) for ref in expert_refs]
    torch_device = resolve_device(device)
    factors, vectors = exclusive_parts(shared, experts, rank=svd_rank, energy=energy, device=torch_device, seed=seed)
    inputs = scored_inputs(AutoTokenizer.from_pretrained(shared_dir), items)
    losses = []
    for expert in experts:
        model = AutoModelForCausalLM.from_pretrained(expert.path).eval().to(torch_device)
        losses.append(continuation_losses(model, inputs))
        del model  # before the next one is loaded
    labels = torch.stack(losses, dim=1).argmin(dim=1)
    twin = assemble_twin(shared_dir, factors, vectors, num_experts=len(experts), router_size=ROUTER_SIZE)
    twin.to(torch_device)
    features = pooled_features(twin, inputs)
    router = train_router(features, labels, num_experts=len(experts), seed=seed)
    with torch.no_grad():
        accuracy = (router(features).argmax(dim=1) == labels).float().mean().item()
    twin.twin_router.load_state_dict(router.state_dict())
    summary = TwinSummary(
        kept_bytes=kept_bytes(factors, vectors),
        experts_bytes=sum(math.prod(e.shape(n)) * e.dtype(n).itemsize for e in experts for n in e.names),
        rank=svd_rank,
        energy=energy,
        router_tasks=sorted({item.task for item in items}),
        router_accuracy=accuracy,
    )
    return twin, summary
