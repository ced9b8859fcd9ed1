"""Turn a finished (or interrupted) run into models: the best, the N-th best, or every Pareto candidate."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from evomerge.errors import EvomergeError
from evomerge.materialize.dataflow_to_disk import write_dataflow_model
from evomerge.materialize.to_disk import merge_to_disk
from evomerge.methods import get_method
from evomerge.recipe.canonical import canonical_key
from evomerge.recipe.dataflow import DataFlowRecipe
from evomerge.recipe.plain import recipe_from_plain
from evomerge.search.run_folder import RunFolder, fully_scored
from evomerge.search.state import SearchState

log = logging.getLogger(__name__)


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    rank: int = 1,
    pareto: bool = False,
    device: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write the chosen candidates as model folders (recipe files and model card included).

    ``device``: where to merge; by default the device the run scored on. A random method (DARE, DELLA)
    draws its masks from the device's generator, so only there is the model written the one scored.
    A data-flow candidate is written layer by layer (no device needed); see dataflow_to_disk.py for
    when its folder needs ``trust_remote_code=True``."""
    run = RunFolder(run_dir)
    state = run.load_checkpoint()
    if not isinstance(state, SearchState) or state.evaluations == 0:
        raise EvomergeError(f"'{run_dir}' has no checkpointed evaluations yet", "let the search finish a generation")
    config = OmegaConf.load(run.config_path)
    scored_on = str(config.device)
    device = device or scored_on
    rows = run.read_evaluations()[: state.evaluations]
    objectives = [o.name for o in config.objectives]
    if pareto:
        # One model per distinct point of the front: candidates with equal scores are alternatives
        # the search could not tell apart, so the earliest stands for them.
        points = {}
        for member in state.front.members:
            if fully_scored(rows[member.id]):  # the loop fronts only those; a front from elsewhere is checked too
                points.setdefault(member.scores, rows[member.id])
        chosen = list(points.values())
        targets = [Path(out_dir) / f"pareto-{n:02d}" for n in range(len(chosen))]
    else:
        ranked = _ranked(rows)
        if not 1 <= rank <= len(ranked):
            raise EvomergeError(
                f"--rank {rank} asks for a candidate the run does not have ({len(ranked)} distinct succeeded on "
                "every item)",
                f"use a rank from 1 to {len(ranked)}",
            )
        chosen, targets = [ranked[rank - 1]], [Path(out_dir)]
    written = []
    for row, target in zip(chosen, targets, strict=True):
        scores = dict(zip(objectives, row["scores"], strict=True)) | (row["metrics"] or {})
        recipe = recipe_from_plain(row["recipe"])
        if isinstance(recipe, DataFlowRecipe):
            written.append(write_dataflow_model(recipe, target, overwrite=overwrite, scores=scores))
        else:
            if get_method(recipe.method).random and torch.device(device).type != torch.device(scored_on).type:
                log.warning(
                    "%s draws its masks from the device's random generator: merged on %s, this model is not the one "
                    "the run scored on %s (export with --device %s for that one)",
                    recipe.method,
                    device,
                    scored_on,
                    scored_on,
                )
            written.append(merge_to_disk(recipe, target, device=device, overwrite=overwrite, scores=scores))
    return written


def _ranked(rows: list[dict]) -> list[dict]:
    """Distinct successful candidates scored on every item, best first by the first objective (earliest
    first among ties). A candidate scored on part of the items (racing, estimated fitness) has an estimate
    for a score, which is what the search ranked it by but not a result: it is never exported."""
    seen, out = set(), []
    for row in rows:
        key = canonical_key(row["recipe"])  # not row["key"]: older runs wrote it in another format
        if row["error"] is None and row["scores"][0] is not None and fully_scored(row) and key not in seen:
            seen.add(key)
            out.append(row)
    return sorted(out, key=lambda r: -r["scores"][0])
