"""A data-flow-space recipe: the path a hidden state takes through the layers of several models.

Data-flow-space merging (Akiba et al. 2024, arXiv:2403.13187, section 3.2) keeps every weight as
it is and chooses which decoder layers run, in which order, and how the hidden state is scaled
where the path crosses from one model to another. As plain data::

    kind: dataflow
    sources: [models/base, models/math, models/lang]
    embedding_source: 2        # embeddings, final norm and LM head come from models/lang
    path:
      - {source: 1, layer: 0, scale: 1.1}   # the hidden state is multiplied by 1.1, then runs math's layer 0
      - {source: 1, layer: 1, scale: 1.0}
      - {source: 0, layer: 2, scale: 0.9}
    max_path_length: 12

A recipe may hold an empty or over-long path: the search logs such a candidate, and `check` (run
before a model is built from it) refuses it with the reason, which the search scores as the worst.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import yaml

from evomerge.dtypes import DTYPE_NAMES
from evomerge.errors import EvomergeError
from evomerge.recipe.canonical import canonical_key

KIND = "dataflow"
_TOP_KEYS = {"kind", "sources", "embedding_source", "path", "max_path_length", "dtype"}
_STEP_KEYS = {"source", "layer", "scale"}


@dataclass(frozen=True)
class PathStep:
    """One position of the path: multiply the hidden state by ``scale``, then run ``layer`` of ``source``."""

    source: int
    layer: int
    scale: float = 1.0


@dataclass(frozen=True)
class DataFlowRecipe:
    sources: tuple[str, ...]
    path: tuple[PathStep, ...]
    embedding_source: int = 0  # index into sources: embeddings, final norm and LM head
    max_path_length: int | None = None  # the longest path a model may be built from (a memory bound)
    dtype: str | None = None

    @property
    def unit_scales(self) -> bool:
        """Every scale is exactly 1: the path is a plain stack of layers (a mergekit passthrough)."""
        return all(step.scale == 1.0 for step in self.path)

    def check(self, layer_counts: Sequence[int]) -> None:
        """Refuse a path no model can be built from; ``layer_counts[i]`` is source i's number of layers."""
        if len(layer_counts) != len(self.sources):
            raise ValueError(f"{len(layer_counts)} layer counts for {len(self.sources)} sources")
        if not 0 <= self.embedding_source < len(self.sources):
            raise EvomergeError(
                f"embedding_source = {self.embedding_source}, but the recipe lists {len(self.sources)} sources",
                f"use a source index from 0 to {len(self.sources) - 1}",
            )
        if not self.path:
            raise EvomergeError(
                "the data-flow path is empty, so the model would have no decoder layers",
                "include at least one layer (a search scores such a candidate as the worst)",
            )
        if self.max_path_length is not None and len(self.path) > self.max_path_length:
            raise EvomergeError(
                f"the data-flow path has {len(self.path)} layers, more than max_path_length = {self.max_path_length}",
                "drop layers from the path or raise max_path_length (it bounds the model's depth and memory)",
            )
        for position, step in enumerate(self.path):
            if not 0 <= step.source < len(self.sources):
                raise EvomergeError(
                    f"path[{position}] names source {step.source}, but the recipe lists {len(self.sources)} sources",
                    f"use a source index from 0 to {len(self.sources) - 1}",
                )
            if not 0 <= step.layer < layer_counts[step.source]:
                raise EvomergeError(
                    f"path[{position}] names layer {step.layer} of '{self.sources[step.source]}', "
                    f"which has {layer_counts[step.source]} layers",
                    f"use a layer index from 0 to {layer_counts[step.source] - 1}",
                )

    def to_plain(self) -> dict:
        out: dict = {"kind": KIND, "sources": list(self.sources), "embedding_source": self.embedding_source}
        out["path"] = [{"source": s.source, "layer": s.layer, "scale": s.scale} for s in self.path]
        if self.max_path_length is not None:
            out["max_path_length"] = self.max_path_length
        if self.dtype is not None:
            out["dtype"] = self.dtype
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_plain(), sort_keys=False, default_flow_style=None)

    def canonical(self) -> str:
        """One string per distinct model: the key of the evaluation cache."""
        return canonical_key(self.to_plain())

    @classmethod
    def from_plain(cls, data: dict, *, where: str = "data-flow recipe") -> DataFlowRecipe:
        unknown = set(data) - _TOP_KEYS
        if unknown:
            raise EvomergeError(f"{where}: unknown key(s) {sorted(unknown)}", f"allowed keys are {sorted(_TOP_KEYS)}")
        if data.get("kind", KIND) != KIND:
            raise EvomergeError(f"{where}: kind is '{data['kind']}'", f"a data-flow recipe has kind: {KIND}")
        sources = data.get("sources")
        if not sources or not isinstance(sources, list):
            raise EvomergeError(
                f"{where}: 'sources' is missing or empty", "list the model folders the path runs through"
            )
        steps = []
        for i, item in enumerate(data.get("path") or []):
            if not isinstance(item, dict) or not {"source", "layer"} <= set(item) or set(item) - _STEP_KEYS:
                raise EvomergeError(
                    f"{where}: path[{i}] is {item!r}", "write each step as {source: INDEX, layer: INDEX, scale: FACTOR}"
                )
            steps.append(
                PathStep(source=int(item["source"]), layer=int(item["layer"]), scale=float(item.get("scale", 1.0)))
            )
        embedding_source = int(data.get("embedding_source", 0))
        if not 0 <= embedding_source < len(sources):
            raise EvomergeError(
                f"{where}: embedding_source = {embedding_source}, but there are {len(sources)} sources",
                f"use a source index from 0 to {len(sources) - 1}",
            )
        dtype = data.get("dtype")
        if dtype is not None and dtype not in DTYPE_NAMES:
            raise EvomergeError(f"{where}: dtype '{dtype}' is not supported", f"use one of {', '.join(DTYPE_NAMES)}")
        cap = data.get("max_path_length")
        return cls(
            sources=tuple(str(s) for s in sources),
            path=tuple(steps),
            embedding_source=embedding_source,
            max_path_length=None if cap is None else int(cap),
            dtype=dtype,
        )


def to_passthrough(recipe: DataFlowRecipe) -> dict:
    """The same stack of layers as a mergekit ``passthrough`` config: one slice per run of consecutive
    layers of one source. Only a path whose scales are all 1 has one (passthrough cannot scale a hidden
    state). mergekit takes the embeddings from the first slice's model and the final norm and LM head
    from the last slice's, so an empty slice (``layer_range: [0, 0]``) of the embedding source opens or
    closes the stack where the path starts or ends in another model."""
    if not recipe.unit_scales:
        raise ValueError("a path with scales other than 1 has no mergekit passthrough form")
    ends = recipe.sources[recipe.embedding_source]
    slices: list[dict] = []
    for step in recipe.path:
        model = recipe.sources[step.source]
        last = slices[-1]["sources"][0] if slices else None
        if last is not None and last["model"] == model and last["layer_range"][1] == step.layer:
            last["layer_range"][1] += 1
        else:
            slices.append({"sources": [{"model": model, "layer_range": [step.layer, step.layer + 1]}]})
    empty = {"sources": [{"model": ends, "layer_range": [0, 0]}]}
    if slices and slices[0]["sources"][0]["model"] != ends:
        slices.insert(0, empty)
    if slices and slices[-1]["sources"][0]["model"] != ends:
        slices.append(empty)
    config = {"slices": slices, "merge_method": "passthrough"}
    if recipe.dtype is not None:
        config["dtype"] = recipe.dtype
    return config
