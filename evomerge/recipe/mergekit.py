"""mergekit's YAML (the ``models:`` form) to a Recipe and back."""

from __future__ import annotations

import warnings

from evomerge.errors import EvomergeError
from evomerge.methods import MergeMethod, get_method
from evomerge.recipe.recipe import ModelEntry, Recipe, _check_dtype
from evomerge.recipe.setting import Setting

_SUPPORTED = {"merge_method", "base_model", "models", "parameters", "dtype", "tokenizer_source", "out_dtype"}


def from_mergekit(data: dict, *, where: str = "mergekit config") -> Recipe:
    unsupported = set(data) - _SUPPORTED
    if "tokenizer" in unsupported:
        raise EvomergeError(
            f"{where}: mergekit's 'tokenizer:' block (a source plus per-token embedding choices) is not supported",
            "write 'tokenizer_source: base', 'union' or a model's path instead (what the block's 'source:' says); "
            "per-token 'tokens:' choices need mergekit",
        )
    if unsupported:
        raise EvomergeError(
            f"{where}: mergekit key(s) {sorted(unsupported)} are not supported by evomerge "
            "(a search recipe takes the 'models:' form; `evomerge merge` also takes 'slices:', never 'modules:')",
            "rewrite the config with 'models:' (or 'slices:' for `evomerge merge`), or run that one with mergekit",
        )
    method = get_method(str(data["merge_method"]))
    base = data.get("base_model")
    entries = []
    for i, item in enumerate(data.get("models") or []):
        if not isinstance(item, dict) or "model" not in item:
            raise EvomergeError(f"{where}: models[{i}] has no 'model'", "write '- model: path/to/model'")
        path = str(item["model"])
        if "+" in path and not path.startswith(("/", ".")):
            raise EvomergeError(f"{where}: '{path}' applies a LoRA, which evomerge does not", "merge the LoRA first")
        params = item.get("parameters") or {}
        # mergekit lists the base among the models for methods that take one; it is the base there
        # (its task vector is zero), so it is kept apart and only its parameters are dropped.
        if method.takes_base and base is not None and path == str(base):
            continue
        settings = {
            k: Setting.from_plain(v, where=f"{where}: models[{i}].{k}")
            for k, v in params.items()
            if _declared(method, k, where)
        }
        entries.append(ModelEntry(model=path, parameters=settings))
    tokenizer = data.get("tokenizer_source")
    return Recipe.from_plain(
        {
            "method": method.name,
            "base": base,
            "models": [{"model": e.model, **{k: s.to_plain() for k, s in e.parameters.items()}} for e in entries],
            "parameters": {k: v for k, v in (data.get("parameters") or {}).items() if _declared(method, k, where)},
            "dtype": _check_dtype(data.get("out_dtype") or data.get("dtype"), where),
            "tokenizer_source": None if tokenizer is None else str(tokenizer),  # base, union or a model's path
            "allow_negative_weights": any(value < 0 for e in entries for value in _numbers(e.parameters.get("weight"))),
        },
        where=where,
    )


def _numbers(setting: Setting | None) -> list[float]:
    return [v for v in setting.scalars() if not isinstance(v, bool)] if setting is not None else []


def _declared(method: MergeMethod, name: str, where: str) -> bool:
    """mergekit accepts and ignores some knobs a method never reads (e.g. density on task_arithmetic);
    drop those with a warning rather than refuse a config that mergekit runs."""
    if any(p.name == name for p in method.params):
        return True
    warnings.warn(
        f"{where}: '{name}' has no effect on '{method.name}' (mergekit ignores it too); dropped", stacklevel=3
    )
    return False


def to_mergekit(recipe: Recipe) -> dict:
    """The same merge as a mergekit config (every parameter-space recipe evomerge writes is expressible)."""
    method = get_method(recipe.method)
    models = [
        {"model": e.model, "parameters": {k: s.to_mergekit() for k, s in e.parameters.items()}} for e in recipe.models
    ]
    for entry in models:
        if not entry["parameters"]:
            del entry["parameters"]
    out: dict = {"merge_method": method.name}
    if recipe.base is not None:
        out["base_model"] = recipe.base
        if method.inputs == "tensors" and method.needs_base:
            # slerp and model_stock take the base from the models list in mergekit.
            models.insert(0, {"model": recipe.base})
    out["models"] = models
    if recipe.parameters:
        out["parameters"] = {k: s.to_mergekit() for k, s in recipe.parameters.items()}
    out["dtype"] = recipe.dtype or "float32"
    if recipe.tokenizer_source is not None:
        out["tokenizer_source"] = recipe.tokenizer_source
    return out
