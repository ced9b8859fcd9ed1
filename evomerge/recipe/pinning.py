"""A recipe with each Hugging Face Hub ID pinned to the commit it resolves to now.

``evomerge merge`` writes the recipe it merged into the output folder. Written as given, ``org/name``
would name whatever its owner pushes next, so merging the written recipe again could read other weights;
``org/name@<commit>`` always reads these. Local folders stay as given (see ``ResolvedModel.pinned``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TypeVar

from evomerge.io.locate import resolve_model
from evomerge.recipe.dataflow import DataFlowRecipe
from evomerge.recipe.recipe import Recipe
from evomerge.recipe.slices import SlicesRecipe

AnyRecipe = TypeVar("AnyRecipe", Recipe, DataFlowRecipe, SlicesRecipe)
# tokenizer_source values that name a rule, not a model
_TOKENIZER_RULES = ("base", "union")


def pin_recipe(recipe: AnyRecipe) -> AnyRecipe:
    """``recipe`` with every model reference (base, models, sources, a tokenizer donor) pinned."""
    if isinstance(recipe, DataFlowRecipe):
        return replace(recipe, sources=tuple(_pin(source) for source in recipe.sources))
    if isinstance(recipe, SlicesRecipe):
        slices = tuple(
            replace(
                piece,
                base=_pin(piece.base),
                sources=tuple(replace(source, model=_pin(source.model)) for source in piece.sources),
            )
            for piece in recipe.slices
        )
        return replace(recipe, slices=slices, base=_pin(recipe.base), tokenizer_source=_pin_tokens(recipe))
    return replace(
        recipe,
        base=_pin(recipe.base),
        models=tuple(replace(entry, model=_pin(entry.model)) for entry in recipe.models),
        tokenizer_source=_pin_tokens(recipe),
    )


def _pin(ref: str | None) -> str | None:
    return None if ref is None else resolve_model(ref).pinned


def _pin_tokens(recipe: Recipe | SlicesRecipe) -> str | None:
    source = recipe.tokenizer_source
    return source if source is None or source in _TOKENIZER_RULES else _pin(source)
