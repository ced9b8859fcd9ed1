"""Parameter-space genome: an optimizer's vector in the unit box ↔ a merge recipe.

Which knobs exist comes from the method's registry entry (one source of truth): every numeric
parameter with a search range is searched unless the config lists a subset. Each searched knob gets
one coordinate per model (for per-model knobs), per layer group and per tensor filter. Coordinates
live in [0, 1] and map linearly onto the knob's range, so bounds hold by construction: no candidate
is ever out of range, and the optimizer never sees the knobs' units.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.methods import Param, get_method
from evomerge.optimizer.space import FloatDim, SearchSpace
from evomerge.recipe.recipe import ModelEntry, Recipe
from evomerge.recipe.setting import Rule, Setting

DEFAULT_FILTER = None  # the rule that matches every tensor no named filter matched


@dataclass(frozen=True)
class Gene:
    """What one coordinate controls."""

    param: str
    model: int | None  # index into the recipe's models; None for a knob of the whole merge
    group: int
    filter: str | None
    low: float
    high: float

    @property
    def name(self) -> str:
        owner = f"m{self.model}" if self.model is not None else "all"
        where = self.filter or "default"
        return f"{self.param}.{owner}.g{self.group}.{where}"


class ParameterSpaceGenome:
    """Maps x ∈ [0, 1]^d to a recipe derived from ``template`` and back."""

    def __init__(
        self,
        *,
        template: Recipe,
        num_layers: int,
        layer_groups: int = 1,
        filters: Sequence[str] = (),
        params: Sequence[str] | None = None,
        ranges: Mapping[str, Sequence[float]] | None = None,
    ) -> None:
        method = get_method(template.method)
        if not 1 <= layer_groups <= max(num_layers, 1):
            raise EvomergeError(
                f"genome.layer_groups = {layer_groups} is out of range for a model of {num_layers} layers",
                f"use a value from 1 (one value for all layers) to {num_layers} (one per layer)",
            )
        ranges = dict(ranges or {})
        numeric = {p.name: p for p in method.params if p.kind is float}
        if params is None:
            chosen = [p for p in numeric.values() if p.search is not None]
        else:
            unknown = [name for name in params if name not in numeric]
            if unknown:
                raise EvomergeError(
                    f"genome.params names '{unknown[0]}', which method '{method.name}' does not have",
                    f"choose from {sorted(numeric)}",
                )
            chosen = [numeric[name] for name in params]
        unranged = [p.name for p in chosen if p.search is None and p.name not in ranges]
        if unranged:
            raise EvomergeError(
                f"genome searches '{unranged[0]}', which has no default search range",
                f"give one, e.g. genome.ranges.{unranged[0]}=[0.5,1.5]",
            )
        self.template = template
        self.num_layers = num_layers
        self.layer_groups = layer_groups
        self.filters: tuple[str | None, ...] = (*filters, DEFAULT_FILTER) if filters else (DEFAULT_FILTER,)
        self.genes = tuple(self._genes(chosen, ranges))
        # Layer i belongs to group _group_of[i]: contiguous, near-equal groups.
        self._group_of = np.array_split(np.arange(max(num_layers, 1)), layer_groups)
        # Which genes fill each (param, model) setting, rule by rule, worked out once: to_recipe runs for
        # every candidate on the search driver.
        self._gene_positions = {
            key: [
                [i for i, g in enumerate(self.genes) if (g.param, g.model, g.filter) == (*key, f)] for f in self.filters
            ]
            for key in dict.fromkeys((g.param, g.model) for g in self.genes)
        }
        self._low = np.array([g.low for g in self.genes])
        self._span = np.array([g.high - g.low for g in self.genes])

    @property
    def dimension(self) -> int:
        return len(self.genes)

    @property
    def space(self) -> SearchSpace:
        return SearchSpace(dims=[FloatDim(name=g.name, low=0.0, high=1.0) for g in self.genes])

    def to_recipe(self, x: Sequence[float]) -> Recipe:
        x = np.clip(np.asarray(x, dtype=float), 0.0, 1.0)
        if x.shape != (self.dimension,):
            raise ValueError(f"expected a vector of {self.dimension} values, got shape {x.shape}")
        values = (self._low + x * self._span).tolist()
        settings: dict[tuple[str, int | None], Setting] = {}
        for key, positions in self._gene_positions.items():
            rules = (
                Rule(filter=f, values=self._per_layer([values[i] for i in genes]))
                for f, genes in zip(self.filters, positions, strict=True)
            )
            settings[key] = Setting(rules=tuple(rules))
        models = tuple(
            replace(entry, parameters={**entry.parameters, **{p: s for (p, m), s in settings.items() if m == i}})
            for i, entry in enumerate(self.template.models)
        )
        parameters = {**self.template.parameters, **{p: s for (p, m), s in settings.items() if m is None}}
        return replace(self.template, models=models, parameters=parameters)

    def from_recipe(self, recipe: Recipe) -> np.ndarray:
        """The vector that gives ``recipe`` (for recipes this genome wrote, or any it can express)."""
        x = np.empty(self.dimension)
        for i, g in enumerate(self.genes):
            entry: ModelEntry | None = recipe.models[g.model] if g.model is not None else None
            setting = (entry.parameters if entry else recipe.parameters).get(g.param)
            first_layer = int(self._group_of[g.group][0])
            t = first_layer / (self.num_layers - 1) if self.num_layers > 1 else 1.0
            probe = f"model.layers.{first_layer}.{g.filter or ''}"
            value = setting.at(probe, t) if setting is not None else None
            if value is None:
                raise ValueError(f"recipe has no value for gene {g.name}")
            x[i] = (value - g.low) / (g.high - g.low)
        return x

    def _per_layer(self, per_group: list[float]) -> tuple[float, ...]:
        if self.layer_groups == 1:
            return (per_group[0],)
        layer_values = [0.0] * self.num_layers
        for group, layers in enumerate(self._group_of):
            for layer in layers:
                layer_values[layer] = per_group[group]
        return tuple(layer_values)

    def _genes(self, chosen: list[Param], ranges: dict[str, Sequence[float]]) -> list[Gene]:
        genes = []
        for param in chosen:
            low, high = ranges.get(param.name, param.search)  # type: ignore[misc]
            for bound in (low, high):
                param.check(float(bound), f"genome.ranges.{param.name}")
            owners: list[int | None] = list(range(len(self.template.models))) if param.per_model else [None]
            for model in owners:
                for group in range(self.layer_groups):
                    for filt in self.filters:
                        genes.append(Gene(param.name, model, group, filt, float(low), float(high)))
        return genes
