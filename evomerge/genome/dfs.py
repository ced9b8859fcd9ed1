"""Data-flow-space genome: a point of the search space ↔ a path through the sources' layers.

As Akiba et al. (2024, arXiv:2403.13187, section 3.2) lay it out: the layers of M sources, all of
source 1 then all of source 2 ..., repeated ``repeats`` times, give T = repeats · sum(L_i) slots, and
one indicator per slot says whether that layer runs (in slot order). Where the hidden state passes
from a layer of source i to a layer of source j it is multiplied by W[i, j]; the embedding output
counts as coming from the embedding source. The diagonal of W is 1 unless ``search_diagonal``;
with ``scales_per_position`` each slot has its own row of W (the scale into slot t from source i).

The indicators are ``BinaryDim``s and the scales ``FloatDim``s in [0, 1] (mapped linearly onto
``scale_range``). That one space serves both optimizers the paper's question needs: CMA-ES searches
the indicators as continuous values thresholded at 0.5, which is the paper's method, and optuna's
samplers (TPE, NSGA-II) search them as categorical on/off choices beside continuous scales.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.optimizer.space import BinaryDim, FloatDim, SearchSpace
from evomerge.recipe.dataflow import DataFlowRecipe, PathStep

# Where CMA-ES starts: None, the centre of the box (Akiba et al.'s start); "embedding_source", that
# source's own path (`DataFlowGenome.embedding_source_path`).
START_POINTS = (None, "embedding_source")


@dataclass(frozen=True)
class Slot:
    source: int
    layer: int
    repeat: int


class DataFlowGenome:
    def __init__(
        self,
        *,
        sources: Sequence[str],
        layer_counts: Sequence[int],
        embedding_source: int = 0,
        repeats: int = 3,
        max_path_length: int | None = None,
        scale_range: Sequence[float] = (0.5, 1.5),
        search_diagonal: bool = False,
        scales_per_position: bool = False,
        start: str | None = None,
        dtype: str | None = None,
    ) -> None:
        if repeats < 1:
            raise EvomergeError(f"genome.repeats = {repeats}", "use repeats >= 1 (the paper uses 3)")
        if not 0 <= embedding_source < len(sources):
            raise EvomergeError(
                f"genome.embedding_source = {embedding_source}, but there are {len(sources)} sources",
                f"use a source index from 0 to {len(sources) - 1}",
            )
        if len(scale_range) != 2:
            raise EvomergeError(f"genome.scale_range = {list(scale_range)}", "give [low, high] with 0 < low < high")
        low, high = (float(v) for v in scale_range)
        if not 0 < low < high:
            raise EvomergeError(f"genome.scale_range = [{low}, {high}]", "give two scales with 0 < low < high")
        self.sources = tuple(sources)
        self.embedding_source = embedding_source
        self.max_path_length = max_path_length
        self.scale_low, self.scale_high = low, high
        self.search_diagonal = search_diagonal
        self.scales_per_position = scales_per_position
        if start not in START_POINTS:
            raise EvomergeError(f"genome.start = {start!r}", f"use one of {list(START_POINTS)}")
        self.start = start
        self.dtype = dtype
        self.slots = tuple(
            Slot(source=m, layer=layer, repeat=r)
            for r in range(repeats)
            for m, count in enumerate(layer_counts)
            for layer in range(count)
        )
        # scale gene index by (slot or None, from, to); only transitions the genome searches have one
        self._scale_gene: dict[tuple[int | None, int, int], int] = {}
        names = [f"use.r{s.repeat}.m{s.source}.l{s.layer}" for s in self.slots]
        m_count = len(self.sources)
        if scales_per_position:
            for t, slot in enumerate(self.slots):
                for i in range(m_count):
                    if i != slot.source or search_diagonal:
                        self._scale_gene[(t, i, slot.source)] = len(names)
                        names.append(f"scale.t{t}.from_m{i}")
        else:
            for i in range(m_count):
                for j in range(m_count):
                    if i != j or search_diagonal:
                        self._scale_gene[(None, i, j)] = len(names)
                        names.append(f"scale.m{i}_to_m{j}")
        self._names = names

    @property
    def dimension(self) -> int:
        return len(self._names)

    @property
    def space(self) -> SearchSpace:
        n_slots = len(self.slots)
        return SearchSpace(
            dims=[
                BinaryDim(name=name) if i < n_slots else FloatDim(name=name, low=0.0, high=1.0)
                for i, name in enumerate(self._names)
            ],
            start=None if self.start is None else self.embedding_source_path(),
        )

    def embedding_source_path(self) -> np.ndarray:
        """The point whose path is the embedding source itself: its layers in order (the first repeat's
        slots), every other slot off, every scale 1 (or the nearest ``scale_range`` allows).

        A search from the centre of the box starts among random half-stacks of every source, which on
        deep models all score zero (issue 19); from here it starts at that model's own score. For
        PS+DFS, source 0 is the PS merge, so this is the PS model's own path.
        """
        x = np.zeros(self.dimension)
        for t, slot in enumerate(self.slots):
            x[t] = float(slot.repeat == 0 and slot.source == self.embedding_source)
        x[len(self.slots) :] = np.clip((1.0 - self.scale_low) / (self.scale_high - self.scale_low), 0.0, 1.0)
        return x

    def to_recipe(self, x: Sequence[float]) -> DataFlowRecipe:
        x = np.clip(np.asarray(x, dtype=float), 0.0, 1.0)
        if x.shape != (self.dimension,):
            raise ValueError(f"expected a vector of {self.dimension} values, got shape {x.shape}")
        path = []
        previous = self.embedding_source
        for t, slot in enumerate(self.slots):
            if x[t] > 0.5:
                key = (t if self.scales_per_position else None, previous, slot.source)
                gene = self._scale_gene.get(key)
                scale = 1.0 if gene is None else self.scale_low + float(x[gene]) * (self.scale_high - self.scale_low)
                path.append(PathStep(source=slot.source, layer=slot.layer, scale=scale))
                previous = slot.source
        return DataFlowRecipe(
            sources=self.sources,
            path=tuple(path),
            embedding_source=self.embedding_source,
            max_path_length=self.max_path_length,
            dtype=self.dtype,
        )
