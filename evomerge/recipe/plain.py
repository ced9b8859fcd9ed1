"""A logged recipe back from its plain form, whichever kind it is (told apart by its ``kind`` field)."""

from __future__ import annotations

from evomerge.recipe.dataflow import KIND, DataFlowRecipe
from evomerge.recipe.recipe import Recipe


def recipe_from_plain(data: dict, *, where: str = "recipe") -> Recipe | DataFlowRecipe:
    """Parameter-space recipes carry no ``kind`` (rows logged before data-flow recipes existed have none)."""
    if data.get("kind") == KIND:
        return DataFlowRecipe.from_plain(data, where=where)
    return Recipe.from_plain(data, where=where)
