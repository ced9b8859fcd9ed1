"""The checkpoints a recipe merges, opened and checked once, and the per-tensor inputs a method takes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.io.checkpoint import Checkpoint
from evomerge.io.compatibility import check_compatible
from evomerge.methods import MergeMethod
from evomerge.recipe.recipe import Recipe

# Every family evomerge merges lays its causal LM out as Llama does; a model saved with tied embeddings
# stores no head, and transformers uses its input embedding as the head.
HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"


class TiedHead:
    """A checkpoint saved with tied embeddings, read as an untied one whose head is its embedding: what
    a merge with an untied checkpoint reads for it (mergekit 0.1.5 reads it so too, by ``tied_names``)."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.config = {**checkpoint.config, "tie_word_embeddings": False}
        self.names = [*checkpoint.names, HEAD]

    @property
    def ref(self) -> str:
        return self.checkpoint.ref

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    @property
    def num_layers(self) -> int:
        return self.checkpoint.num_layers

    def shape(self, name: str) -> tuple[int, ...]:
        return self.checkpoint.shape(_stored(name))

    def dtype(self, name: str) -> torch.dtype:
        return self.checkpoint.dtype(_stored(name))

    def load(self, name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.checkpoint.load(_stored(name), device=device, dtype=dtype)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        return self.checkpoint.read_into(_stored(name), out)

    def __repr__(self) -> str:
        return f"TiedHead({self.checkpoint!r})"


def _stored(name: str) -> str:
    return EMBEDDING if name == HEAD else name


@dataclass(frozen=True)
class MergeSources:
    base: Checkpoint | TiedHead | None
    models: tuple[Checkpoint | TiedHead, ...]

    @classmethod
    def open(cls, recipe: Recipe, method: MergeMethod) -> MergeSources:
        """Open the recipe's checkpoints. Where some store a head and others are tied, all are read as
        untied (the merged head then merges the tied ones' embeddings), and so is the output."""
        has_base = recipe.base is not None and method.needs_base
        checkpoints = [Checkpoint.open(path) for path in ([recipe.base] if has_base else []) + recipe.model_paths]
        if any(HEAD in c.names for c in checkpoints):
            checkpoints = [TiedHead(c) if HEAD not in c.names and EMBEDDING in c.names else c for c in checkpoints]
        base = checkpoints.pop(0) if has_base else None
        sources = cls(base=base, models=tuple(checkpoints))
        check_compatible(sources.reference, [c for c in sources.all if c is not sources.reference])
        return sources

    @property
    def reference(self) -> Checkpoint | TiedHead:
        """The checkpoint whose config, tensor order and generation config the output takes."""
        return self.base if self.base is not None else self.models[0]

    @property
    def all(self) -> list[Checkpoint | TiedHead]:
        return ([self.base] if self.base is not None else []) + list(self.models)

    @property
    def tied(self) -> list[str]:
        """The sources saved with tied embeddings that are merged as untied ones (their head: their embedding)."""
        return [c.ref for c in self.all if isinstance(c, TiedHead)]

    def inputs(
        self, method: MergeMethod, name: str, *, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(base, stacked)`` for one tensor: stacked task vectors or raw tensors, as the method takes."""
        base = self.base.load(name, device=device, dtype=dtype) if self.base is not None else None
        stacked = torch.stack([m.load(name, device=device, dtype=dtype) for m in self.models])
        if method.inputs == "deltas":
            stacked.sub_(base)
        return base, stacked
