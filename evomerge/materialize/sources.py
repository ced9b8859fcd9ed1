"""The checkpoints a recipe merges, opened and checked once, and the per-tensor inputs a method takes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.io.checkpoint import Checkpoint
from evomerge.io.compatibility import check_compatible
from evomerge.materialize.vocabulary import OutputVocabulary
from evomerge.methods import MergeMethod
from evomerge.recipe.recipe import Recipe

# Every family evomerge merges lays its causal LM out as Llama does; a model saved with tied embeddings
# stores no head, and transformers uses its input embedding as the head.
HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"
# Their rows are tokens: a recipe's tokenizer_source moves them to its vocabulary (vocabulary.py).
VOCABULARY_TENSORS = (EMBEDDING, HEAD)


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
    # Set by a recipe's tokenizer_source: embedding and head rows are then read in its vocabulary.
    vocabulary: OutputVocabulary | None = None

    @classmethod
    def open(cls, recipe: Recipe, method: MergeMethod) -> MergeSources:
        """Open the recipe's checkpoints. Where some store a head and others are tied, all are read as
        untied (the merged head then merges the tied ones' embeddings), and so is the output."""
        has_base = recipe.base is not None and method.takes_base
        checkpoints = [Checkpoint.open(path) for path in ([recipe.base] if has_base else []) + recipe.model_paths]
        if any(HEAD in c.names for c in checkpoints):
            checkpoints = [TiedHead(c) if HEAD not in c.names and EMBEDDING in c.names else c for c in checkpoints]
        check_compatible(
            checkpoints[0],
            checkpoints[1:],
            vocabulary=[n for n in VOCABULARY_TENSORS if n in checkpoints[0].names],
            remapped=recipe.tokenizer_source is not None,
        )
        vocabulary = None
        if recipe.tokenizer_source is not None:
            vocabulary = OutputVocabulary.build(
                recipe.tokenizer_source,
                checkpoints=checkpoints,
                rows_in=[c.shape(EMBEDDING)[0] for c in checkpoints],
                has_base=has_base,
            )
        base = checkpoints.pop(0) if has_base else None
        return cls(base=base, models=tuple(checkpoints), vocabulary=vocabulary)

    @property
    def reference(self) -> Checkpoint | TiedHead:
        """The checkpoint whose config, tensor order and generation config the output takes."""
        return self.base if self.base is not None else self.models[0]

    @property
    def config(self) -> dict:
        """The output's config: the reference's, with the output vocabulary's size."""
        if self.vocabulary is None:
            return self.reference.config
        return {**self.reference.config, "vocab_size": self.vocabulary.size}

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name`` as the method reads it (and the output holds it)."""
        shape = self.reference.shape(name)
        return (self.vocabulary.size, *shape[1:]) if self.remaps(name) else shape

    def remaps(self, name: str) -> bool:
        return self.vocabulary is not None and name in VOCABULARY_TENSORS

    def remapped(self, name: str, *, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """Every source's tensor ``name`` (base first) with its rows in the output vocabulary."""
        return self.vocabulary.remap([c.load(name, device=device, dtype=dtype) for c in self.all])

    @property
    def all(self) -> list[Checkpoint | TiedHead]:
        return ([self.base] if self.base is not None else []) + list(self.models)

    @property
    def tied(self) -> list[str]:
        """The sources saved with tied embeddings that are merged as untied ones (their head: their embedding)."""
        return [c.ref for c in self.all if isinstance(c, TiedHead)]

    def input_shapes(self, name: str) -> tuple[tuple[int, ...] | None, tuple[int, ...]]:
        """The shapes of ``inputs``' ``(base, stacked)`` for tensor ``name``, read from the headers alone."""
        shape = self.shape(name)
        return (shape if self.base is not None else None), (len(self.models), *shape)

    def inputs(
        self, method: MergeMethod, name: str, *, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(base, stacked)`` for one tensor: stacked task vectors or raw tensors, as the method takes."""
        if self.remaps(name):
            tensors = self.remapped(name, device=device, dtype=dtype)
        else:
            tensors = [c.load(name, device=device, dtype=dtype) for c in self.all]
        base = tensors.pop(0) if self.base is not None else None
        stacked = torch.stack(tensors)
        if method.inputs == "deltas":
            stacked.sub_(base)
        return base, stacked
