"""A parameter-space merge recipe: plain data that round-trips through evomerge's YAML and mergekit's.

evomerge's form puts each model's knobs beside it, which is what a reader wants to see::

    method: ties
    base: models/base
    models:
      - model: models/math
        weight: 0.6
        density: {self_attn: 0.4, mlp: [0.2, 0.8], default: 0.5}
      - model: models/lang
        weight: 0.4
        density: 0.5
    parameters: {lambda: 1.0}
    dtype: float32

``models`` lists the models merged into the base; the base is never repeated there (mergekit allows
it and ignores its task vector, which is zero). Methods that need no base (linear) merge ``models``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from evomerge.dtypes import DTYPE_NAMES
from evomerge.errors import EvomergeError
from evomerge.recipe.canonical import canonical_key
from evomerge.recipe.setting import Setting

FORMAT_KEY = "method"
_TOP_KEYS = {"method", "base", "models", "parameters", "dtype", "tokenizer_source", "seed", "allow_negative_weights"}


@dataclass(frozen=True)
class ModelEntry:
    model: str
    parameters: Mapping[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    method: str
    models: tuple[ModelEntry, ...]
    base: str | None = None
    parameters: Mapping[str, Setting] = field(default_factory=dict)
    dtype: str | None = None
    tokenizer_source: str | None = None
    seed: int = 0
    # A negative weight subtracts a model's task vector (task negation). That is rarely what a typo
    # meant, so it must be asked for; mergekit configs, which allow it silently, set it when needed.
    allow_negative_weights: bool = False

    @property
    def model_paths(self) -> list[str]:
        return [entry.model for entry in self.models]

    def to_plain(self) -> dict:
        out: dict = {"method": self.method}
        if self.base is not None:
            out["base"] = self.base
        out["models"] = [{"model": e.model, **{k: s.to_plain() for k, s in e.parameters.items()}} for e in self.models]
        if self.parameters:
            out["parameters"] = {k: s.to_plain() for k, s in self.parameters.items()}
        if self.dtype is not None:
            out["dtype"] = self.dtype
        if self.tokenizer_source is not None:
            out["tokenizer_source"] = self.tokenizer_source
        out["seed"] = self.seed
        if self.allow_negative_weights:
            out["allow_negative_weights"] = True
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_plain(), sort_keys=False, default_flow_style=None)

    def canonical(self) -> str:
        """One string per distinct merge: the key of the evaluation cache."""
        return canonical_key(self.to_plain())

    @classmethod
    def from_plain(cls, data: dict, *, where: str = "recipe") -> Recipe:
        unknown = set(data) - _TOP_KEYS
        if unknown:
            raise EvomergeError(
                f"{where}: unknown key(s) {sorted(unknown)}",
                f"allowed top-level keys are {sorted(_TOP_KEYS)}",
            )
        if not data.get("models"):
            raise EvomergeError(f"{where}: 'models' is missing or empty", "list at least one model to merge")
        entries = []
        for i, item in enumerate(data["models"]):
            if isinstance(item, str):
                item = {"model": item}
            if not isinstance(item, dict) or "model" not in item:
                raise EvomergeError(f"{where}: models[{i}] has no 'model' path", "write '- model: path/to/model'")
            params = {
                k: Setting.from_plain(v, where=f"{where}: models[{i}].{k}") for k, v in item.items() if k != "model"
            }
            entries.append(ModelEntry(model=str(item["model"]), parameters=params))
        params = {
            k: Setting.from_plain(v, where=f"{where}: parameters.{k}")
            for k, v in (data.get("parameters") or {}).items()
        }
        return cls(
            method=str(data.get("method")),
            models=tuple(entries),
            base=None if data.get("base") is None else str(data["base"]),
            parameters=params,
            dtype=_check_dtype(data.get("dtype"), where),
            tokenizer_source=_check_tokenizer_source(data.get("tokenizer_source"), where),
            seed=int(data.get("seed", 0)),
            allow_negative_weights=bool(data.get("allow_negative_weights", False)),
        )


def _check_dtype(dtype: object, where: str) -> str | None:
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise EvomergeError(f"{where}: dtype '{dtype}' is not supported", f"use one of {', '.join(DTYPE_NAMES)}")
    return dtype  # type: ignore[return-value]


def _check_tokenizer_source(source: object, where: str) -> str | None:
    if source is not None and (not isinstance(source, str) or not source.strip()):
        raise EvomergeError(
            f"{where}: tokenizer_source {source!r} is not a name",
            "use 'base' (the base's vocabulary), 'union' (every model's tokens) or the path of a merged model",
        )
    return source


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe file in evomerge's format or mergekit's (told apart by ``merge_method``)."""
    from evomerge.recipe.mergekit import from_mergekit

    path = Path(path)
    if not path.is_file():
        raise EvomergeError(f"recipe file '{path}' does not exist", "check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise EvomergeError(f"'{path}' is not valid YAML ({error})", "fix the syntax at the line shown") from error
    if not isinstance(data, dict):
        raise EvomergeError(f"'{path}' does not hold a recipe (a YAML mapping)", "see README.md for the format")
    if "merge_method" in data:
        return from_mergekit(data, where=str(path))
    if FORMAT_KEY in data:
        return Recipe.from_plain(data, where=str(path))
    raise EvomergeError(
        f"'{path}' has neither 'method' (evomerge) nor 'merge_method' (mergekit)",
        "add the merge method's name under one of those keys",
    )
