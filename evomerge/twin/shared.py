"""The shared model: a finished parameter-space search's chosen merge, or a recipe file's, written to disk."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from evomerge.errors import EvomergeError
from evomerge.export import export_run
from evomerge.materialize.model_card import RECIPE_NAME
from evomerge.materialize.to_disk import merge_to_disk
from evomerge.recipe.plain import load_any_recipe
from evomerge.recipe.recipe import Recipe
from evomerge.search.run_folder import RunFolder


def write_shared(source: str | Path, folder: Path, *, rank: int = 1, device: str = "cpu") -> Recipe:
    """Write the shared model to ``folder`` and return its recipe (the experts are its models).

    ``source``: a run folder (its ``rank``-th best candidate, as ``evomerge export`` picks) or a recipe file."""
    source = Path(source)
    if RunFolder(source).config_path.is_file():
        export_run(source, folder, rank=rank, device=device)
        recipe = _parameter_space(load_any_recipe(folder / RECIPE_NAME), source)
    else:
        recipe = _parameter_space(load_any_recipe(source), source)
        merge_to_disk(recipe, folder, device=device)
    return recipe


def shared_models(source: str | Path) -> list[str]:
    """The models the shared merge reads, from the run's config or the recipe file alone: nothing is merged."""
    source = Path(source)
    if RunFolder(source).config_path.is_file():
        return [str(path) for path in OmegaConf.load(RunFolder(source).config_path).models.experts]
    return _parameter_space(load_any_recipe(source), source).model_paths


def _parameter_space(recipe: object, source: Path) -> Recipe:
    if not isinstance(recipe, Recipe):
        raise EvomergeError(
            f"'{source}' gives a {type(recipe).__name__} (a stack of layers), not a parameter-space merge; Twin-Merging "
            "needs one set of weights shared by every expert, to which each expert's difference is added",
            "pass a parameter-space (PS) search run, or a recipe file with a merge method such as task_arithmetic",
        )
    return recipe


def run_tasks(source: str | Path) -> tuple[list[str], str | None]:
    """The task names and include path a run searched on: the router's training items."""
    config = OmegaConf.load(RunFolder(source).config_path)
    include = config.tasks.get("include_path")
    return list(config.tasks.names), None if include is None else str(include)
