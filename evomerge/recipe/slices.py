"""mergekit's ``slices:`` form as plain data: a stack of layer ranges, each slice copied or merged.

A passthrough stack (a "frankenmerge") copies one model's layer range per slice::

    merge_method: passthrough
    slices:
      - sources: [{model: models/base, layer_range: [0, 16]}]
      - sources: [{model: models/math, layer_range: [8, 24]}]

A slice with several sources, each with a layer range of the same length, merges them layer by layer
with the config's ``merge_method``; ``base_model`` and ``parameters`` may be given per slice, and
parameters per source. Read as mergekit 0.1.5 reads them (``config.py``, ``plan.py``):
- a parameter is looked up on the source, then the slice, then the config;
- a gradient runs over each slice's own layers (``t = i / (n - 1)``, 1 for a one-layer slice);
- the embeddings are merged from the first slice's sources with its settings, the final norm and the
  LM head from the last slice's (at ``t = 0``);
- the output has as many layers as the slices together.
mergekit keeps one method per config: it ignores a ``merge_method`` given on a slice, which is refused here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from evomerge.errors import EvomergeError
from evomerge.methods import get_method
from evomerge.recipe.mergekit import _declared
from evomerge.recipe.recipe import ModelEntry, Recipe, _check_dtype
from evomerge.recipe.setting import Setting

PASSTHROUGH = "passthrough"
# passthrough's one knob in mergekit 0.1.5 (merge_methods/passthrough.py): a factor on every tensor of a source.
PASSTHROUGH_SCALE = "scale"
_TOP_KEYS = {"merge_method", "slices", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source"}
_SLICE_KEYS = {"sources", "base_model", "parameters"}
_SOURCE_KEYS = {"model", "layer_range", "parameters"}


@dataclass(frozen=True)
class SliceSource:
    """Layers ``layer_range[0]`` to ``layer_range[1] - 1`` of one model."""

    model: str
    layer_range: tuple[int, int]
    parameters: Mapping[str, Setting] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


@dataclass(frozen=True)
class Slice:
    sources: tuple[SliceSource, ...]
    base: str | None = None
    parameters: Mapping[str, Setting] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.sources[0].length


@dataclass(frozen=True)
class SlicesRecipe:
    method: str
    slices: tuple[Slice, ...]
    base: str | None = None
    parameters: Mapping[str, Setting] = field(default_factory=dict)
    dtype: str | None = None
    tokenizer_source: str | None = None

    @property
    def num_layers(self) -> int:
        return sum(piece.length for piece in self.slices)

    @property
    def model_paths(self) -> list[str]:
        """Every model the recipe reads, once each, in order of first mention (the base first)."""
        paths = [self.base] if self.base else []
        paths += [s.base for s in self.slices if s.base] + [src.model for s in self.slices for src in s.sources]
        return list(dict.fromkeys(paths))

    def base_of(self, index: int) -> str | None:
        return self.slices[index].base or self.base

    def slice_recipe(self, index: int) -> Recipe:
        """Slice ``index`` as a parameter-space recipe over its sources (each read from its layer range):
        source settings first, then the slice's, then the config's, as mergekit looks them up."""
        piece, base = self.slices[index], self.base_of(index)
        takes_base = get_method(self.method).takes_base
        return Recipe(
            method=self.method,
            models=tuple(
                ModelEntry(model=src.model, parameters=src.parameters)
                for src in piece.sources
                if not (takes_base and src.model == base)
            ),
            base=base if takes_base else None,
            parameters={**self.parameters, **piece.parameters},
            dtype=self.dtype,
            allow_negative_weights=True,  # mergekit takes negative weights silently
        )

    def to_mergekit(self) -> dict:
        out: dict = {"merge_method": self.method, "slices": [_slice_plain(piece) for piece in self.slices]}
        if self.base is not None:
            out["base_model"] = self.base
        if self.parameters:
            out["parameters"] = {k: s.to_mergekit() for k, s in self.parameters.items()}
        if self.dtype is not None:
            out["dtype"] = self.dtype
        if self.tokenizer_source is not None:
            out["tokenizer_source"] = self.tokenizer_source
        return out

    @classmethod
    def from_mergekit(cls, data: dict, *, where: str = "mergekit config") -> SlicesRecipe:
        _refuse_unknown(data, _TOP_KEYS, where)
        method = str(data.get("merge_method"))
        if method != PASSTHROUGH:
            get_method(method)  # an unknown name is refused with the list of known ones
        pieces = data.get("slices")
        if not isinstance(pieces, list) or not pieces:
            raise EvomergeError(f"{where}: 'slices' is empty or not a list", "list at least one slice")
        tokenizer = data.get("tokenizer_source")
        if tokenizer == "union":
            raise EvomergeError(
                f"{where}: tokenizer_source 'union' builds a new vocabulary, which a slices: stack does not",
                "use 'base' or a model path (the stacked models must share one vocabulary), or merge with the "
                "models: form, which remaps vocabularies",
            )
        recipe = cls(
            method=method,
            slices=tuple(_slice(piece, method, f"{where}: slices[{i}]") for i, piece in enumerate(pieces)),
            base=_model_path(data.get("base_model"), f"{where}: base_model"),
            parameters=_settings(data.get("parameters"), method, f"{where}: parameters"),
            dtype=_check_dtype(data.get("out_dtype") or data.get("dtype"), where),
            tokenizer_source=None if tokenizer in (None, "base") else str(tokenizer),
        )
        if method != PASSTHROUGH and get_method(method).takes_base:
            needs_base = get_method(method).needs_base
            for i, piece in enumerate(recipe.slices):
                base = recipe.base_of(i)
                # A method that merges with or without a base (nuslerp) still needs a named one among the
                # sources: mergekit refuses a slice whose base it cannot read.
                if (needs_base or base is not None) and base not in [src.model for src in piece.sources]:
                    raise EvomergeError(
                        f"{where}: slices[{i}] is merged with '{method}', which needs a base model among the "
                        f"slice's sources, and {'none is set' if base is None else repr(base) + ' is not one'}",
                        "list the base model among the slice's sources with its layer_range, and name it in "
                        "base_model (for the config or for the slice)",
                    )
        return recipe


def _slice(data: object, method: str, where: str) -> Slice:
    if not isinstance(data, dict) or not data.get("sources"):
        raise EvomergeError(
            f"{where} has no 'sources'", "write '- sources: [{model: PATH, layer_range: [START, END]}]'"
        )
    if "merge_method" in data:
        raise EvomergeError(
            f"{where} sets its own merge_method, which mergekit 0.1.5 ignores (one method merges every slice)",
            "merge that range in a separate config and stack the result, or use the config's merge_method",
        )
    _refuse_unknown(data, _SLICE_KEYS, where)
    sources = tuple(_source(item, method, f"{where}.sources[{j}]") for j, item in enumerate(data["sources"]))
    lengths = [src.length for src in sources]
    if len(set(lengths)) > 1:
        raise EvomergeError(
            f"{where}: its sources' layer ranges hold {lengths} layers, and a slice merges them layer by layer",
            "give every source of a slice a layer range of the same length",
        )
    models = [src.model for src in sources]
    if len(set(models)) < len(models):
        raise EvomergeError(
            f"{where} lists one model twice, and mergekit keys a slice's inputs by model",
            "list each model once per slice (merge two ranges of one model in separate slices)",
        )
    if method == PASSTHROUGH and len(sources) > 1:
        raise EvomergeError(
            f"{where}: passthrough copies one source per slice, and this slice lists {len(sources)}",
            "give the slice one source, or merge them with a merge method (e.g. merge_method: linear)",
        )
    return Slice(
        sources=sources,
        base=_model_path(data.get("base_model"), f"{where}.base_model"),
        parameters=_settings(data.get("parameters"), method, f"{where}.parameters"),
    )


def _source(data: object, method: str, where: str) -> SliceSource:
    if not isinstance(data, dict) or "model" not in data:
        raise EvomergeError(f"{where} has no 'model'", "write '{model: PATH, layer_range: [START, END]}'")
    _refuse_unknown(data, _SOURCE_KEYS, where)
    bounds = data.get("layer_range")
    valid = isinstance(bounds, list | tuple) and len(bounds) == 2 and all(type(b) is int for b in bounds)
    if not valid or not 0 <= bounds[0] <= bounds[1]:
        raise EvomergeError(
            f"{where}: layer_range is {bounds!r}",
            "give [START, END] with 0 <= START <= END: layers START to END - 1 of the model",
        )
    return SliceSource(
        model=_model_path(data["model"], f"{where}.model"),
        layer_range=(bounds[0], bounds[1]),
        parameters=_settings(data.get("parameters"), method, f"{where}.parameters"),
    )


def _model_path(value: object, where: str) -> str | None:
    if value is None:
        return None
    path = str(value)
    if "+" in path and not path.startswith(("/", ".")):
        raise EvomergeError(f"{where}: '{path}' applies a LoRA, which evomerge does not", "merge the LoRA first")
    return path


def _settings(data: object, method: str, where: str) -> dict[str, Setting]:
    settings = {k: Setting.from_plain(v, where=f"{where}.{k}") for k, v in (data or {}).items()}
    if method != PASSTHROUGH:
        return {k: s for k, s in settings.items() if _declared(get_method(method), k, where)}
    unknown = set(settings) - {PASSTHROUGH_SCALE}
    if unknown:
        raise EvomergeError(
            f"{where}: passthrough has no parameter(s) {sorted(unknown)}", f"its one parameter is '{PASSTHROUGH_SCALE}'"
        )
    return settings


def _refuse_unknown(data: dict, allowed: set[str], where: str) -> None:
    unknown = set(data) - allowed
    if unknown:
        raise EvomergeError(
            f"{where}: key(s) {sorted(unknown)} are not supported in mergekit's slices form by evomerge",
            f"use only {sorted(allowed)}, or run that config with mergekit",
        )


def _slice_plain(piece: Slice) -> dict:
    sources = []
    for src in piece.sources:
        entry: dict = {"model": src.model, "layer_range": list(src.layer_range)}
        if src.parameters:
            entry["parameters"] = {k: s.to_mergekit() for k, s in src.parameters.items()}
        sources.append(entry)
    out: dict = {"sources": sources}
    if piece.base is not None:
        out["base_model"] = piece.base
    if piece.parameters:
        out["parameters"] = {k: s.to_mergekit() for k, s in piece.parameters.items()}
    return out
