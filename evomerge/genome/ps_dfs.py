"""PS+DFS: a data-flow search whose first source is a parameter-space merge, the combination behind
Akiba et al.'s (2024) best model.

The PS recipe comes from a recipe file or from an earlier run's best candidate (the search session
reads those: ``evomerge.search.session.ps_recipe``). It is merged once, into the run folder, and from
then on is a source like any other: the search, a resume and the export all read that folder
(``merge_to_disk`` writes it whole or not at all, so a killed merge is redone).
"""

from __future__ import annotations

from pathlib import Path

import torch

from evomerge.materialize.to_disk import merge_to_disk
from evomerge.recipe.recipe import Recipe

PS_SOURCE_FOLDER = "ps_source"


def ps_source_folder(run_dir: str | Path) -> Path:
    return Path(run_dir) / PS_SOURCE_FOLDER


def reference_model(recipe: Recipe) -> str:
    """The checkpoint whose config (and so whose layer count) the merged model takes."""
    return recipe.base if recipe.base is not None else recipe.models[0].model


def merge_ps_source(recipe: Recipe, run_dir: str | Path, *, device: str = "cpu") -> Path:
    """Merge the PS recipe into the run folder unless an earlier start already did."""
    folder = ps_source_folder(run_dir)
    if not folder.exists():
        merge_to_disk(recipe, folder, device=device)
        if torch.device(device).type == "cuda":
            # The search's driver goes on to start the workers: the merge's cached blocks would hold
            # memory on the GPU the first worker needs (and that its memory check does not see as free).
            torch.cuda.empty_cache()
    return folder
