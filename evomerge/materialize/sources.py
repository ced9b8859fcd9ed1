"""The checkpoints a recipe merges, opened and checked once, and the per-tensor inputs a method takes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evomerge.io.checkpoint import Checkpoint
from evomerge.io.compatibility import check_compatible
from evomerge.methods import MergeMethod
from evomerge.recipe.recipe import Recipe


@dataclass(frozen=True)
class MergeSources:
    base: Checkpoint | None
    models: tuple[Checkpoint, ...]

    @classmethod
    def open(cls, recipe: Recipe, method: MergeMethod) -> MergeSources:
        base = Checkpoint.open(recipe.base) if recipe.base is not None and method.needs_base else None
        models = tuple(Checkpoint.open(path) for path in recipe.model_paths)
        sources = cls(base=base, models=models)
        check_compatible(sources.reference, [c for c in sources.all if c is not sources.reference])
        return sources

    @property
    def reference(self) -> Checkpoint:
        """The checkpoint whose config, tensor order and generation config the output takes."""
        return self.base if self.base is not None else self.models[0]

    @property
    def all(self) -> list[Checkpoint]:
        return ([self.base] if self.base is not None else []) + list(self.models)

    def inputs(
        self, method: MergeMethod, name: str, *, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(base, stacked)`` for one tensor: stacked task vectors or raw tensors, as the method takes."""
        base = self.base.load(name, device=device, dtype=dtype) if self.base is not None else None
        stacked = torch.stack([m.load(name, device=device, dtype=dtype) for m in self.models])
        if method.inputs == "deltas":
            stacked.sub_(base)
        return base, stacked
