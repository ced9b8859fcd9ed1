"""A recipe back from its plain form or its file, whichever kind it is (told apart by a ``kind`` field)."""

from __future__ import annotations

from pathlib import Path

import yaml

from evomerge.recipe.dataflow import KIND, DataFlowRecipe
from evomerge.recipe.recipe import Recipe, load_recipe
from evomerge.recipe.slices import SlicesRecipe


def recipe_from_plain(data: dict, *, where: str = "recipe") -> Recipe | DataFlowRecipe:
    """Parameter-space recipes carry no ``kind`` (rows logged before data-flow recipes existed have none)."""
    if data.get("kind") == KIND:
        return DataFlowRecipe.from_plain(data, where=where)
    return Recipe.from_plain(data, where=where)


def load_any_recipe(path: str | Path) -> Recipe | DataFlowRecipe | SlicesRecipe:
    """A recipe file: a data-flow recipe (``kind: dataflow``), a mergekit config in the ``slices:`` form,
    else whatever ``load_recipe`` reads."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        data = None  # load_recipe names the syntax error
    if isinstance(data, dict) and data.get("kind") == KIND:
        return DataFlowRecipe.from_plain(data, where=str(path))
    if isinstance(data, dict) and "merge_method" in data and "slices" in data:
        return SlicesRecipe.from_mergekit(data, where=str(path))
    return load_recipe(path)
