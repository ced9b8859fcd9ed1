"""PS+DFS: a data-flow search whose first source is a parameter-space merge, the combination behind
Akiba et al.'s (2024) best model.

The PS merge comes from a recipe file or from an earlier run (its best candidate). It is merged once,
into the run folder, and from then on is a source like any other: the search, a resume and the export
all read that folder (``merge_to_disk`` writes it whole or not at all, so a killed merge is redone).
"""

from __future__ import annotations

from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.materialize.to_disk import merge_to_disk
from evomerge.recipe.recipe import Recipe, load_recipe

PS_SOURCE_FOLDER = "ps_source"


def ps_recipe(ps_source: str | Path) -> Recipe:
    """The PS recipe named by ``genome.ps_source``: a recipe file, or a run folder's best candidate."""
    from evomerge.search.run_folder import RunFolder

    path = Path(ps_source)
    if path.is_file():
        return load_recipe(path)
    state = RunFolder(path).load_checkpoint() if path.is_dir() else None
    if state is None or state.best is None:
        raise EvomergeError(
            f"genome.ps_source '{path}' is neither a recipe file nor a run folder with a scored best candidate",
            "point it at a PS recipe (e.g. an exported model's evomerge_recipe.yaml) or at a finished PS run",
        )
    if state.best.recipe.get("kind") is not None:
        raise EvomergeError(
            f"the best candidate of run '{path}' is a {state.best.recipe['kind']} recipe, not a parameter-space merge",
            "point genome.ps_source at a run searched with genome=ps",
        )
    return Recipe.from_plain(state.best.recipe, where=f"best candidate of {path}")


def ps_source_folder(run_dir: str | Path) -> Path:
    return Path(run_dir) / PS_SOURCE_FOLDER


def reference_model(recipe: Recipe) -> str:
    """The checkpoint whose config (and so whose layer count) the merged model takes."""
    return recipe.base if recipe.base is not None else recipe.models[0].model


def merge_ps_source(ps_source: str | Path, run_dir: str | Path, *, device: str = "cpu") -> Path:
    """Merge the PS recipe into the run folder unless an earlier start already did."""
    folder = ps_source_folder(run_dir)
    if not folder.exists():
        merge_to_disk(ps_recipe(ps_source), folder, device=device)
    return folder
