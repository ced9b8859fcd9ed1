"""From a recipe to the arguments of one method call per tensor, checked against the method's registry entry."""

from __future__ import annotations

import zlib

import torch

from evomerge.errors import EvomergeError
from evomerge.io.checkpoint import layer_index
from evomerge.methods import MergeMethod, get_method
from evomerge.recipe.recipe import Recipe


def validate(recipe: Recipe) -> MergeMethod:
    """Check a recipe against its method's declared parameters; return the method."""
    method = get_method(recipe.method)
    if method.needs_base and recipe.base is None:
        raise EvomergeError(f"merge method '{method.name}' needs a base model", "add 'base: path/to/base'")
    count = len(recipe.models)
    if count < method.min_models or (method.max_models is not None and count > method.max_models):
        wanted = (
            f"exactly {method.min_models}"
            if method.min_models == method.max_models
            else f"at least {method.min_models}" + (f" and at most {method.max_models}" if method.max_models else "")
        )
        raise EvomergeError(
            f"merge method '{method.name}' merges {wanted} model(s) besides the base, the recipe lists {count}",
            "change the models list or pick another method",
        )
    for name, setting in recipe.parameters.items():
        param = method.param(name)
        for value in setting.scalars():
            param.check(value, f"parameters.{name}")
    for i, entry in enumerate(recipe.models):
        for name, setting in entry.parameters.items():
            param = method.param(name)
            if not param.per_model:
                raise EvomergeError(
                    f"models[{i}] sets '{name}', which applies to the whole merge, not to one model",
                    f"move '{name}' under 'parameters:'",
                )
            for value in setting.scalars():
                param.check(value, f"models[{i}] ({entry.model}).{name}")
                if name == "weight" and value < 0 and not recipe.allow_negative_weights:
                    raise EvomergeError(
                        f"models[{i}] ({entry.model}) has weight {value}, which subtracts its task vector",
                        "if that is intended (task negation), add 'allow_negative_weights: true' to the recipe",
                    )
    for param in method.params:
        if param.default is not None:
            continue
        if param.per_model:
            missing = [
                e.model for e in recipe.models if param.name not in e.parameters and param.name not in recipe.parameters
            ]
            if missing:
                raise EvomergeError(
                    f"merge method '{method.name}' needs '{param.name}' for every model; {missing[0]} has none",
                    f"give each model a '{param.name}', or one under 'parameters:' for all",
                )
        elif param.name not in recipe.parameters:
            raise EvomergeError(
                f"merge method '{method.name}' needs the parameter '{param.name}'",
                "add it under 'parameters:'",
            )
    return method


def depth(tensor_name: str, num_layers: int) -> float:
    """mergekit's interpolation point: layer i of L at i/(L-1) (1 for L = 1), other tensors at 0."""
    layer = layer_index(tensor_name)
    if layer is None:
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def method_kwargs(
    recipe: Recipe, method: MergeMethod, tensor_name: str, *, num_layers: int, device: torch.device
) -> dict[str, object]:
    """Keyword arguments of ``method.merge`` for one tensor.

    Per-model values travel as a float64 tensor: mergekit keeps ``int(density * n)`` entries with a
    Python float, and density 0.7 rounded to float32 keeps one entry fewer on some sizes. The methods
    round weights to the tensors' dtype themselves, as mergekit does.
    """
    t = depth(tensor_name, num_layers)
    kwargs: dict[str, object] = {}
    for param in method.params:
        fallback = recipe.parameters.get(param.name)
        if param.per_model:
            values = []
            for entry in recipe.models:
                setting = entry.parameters.get(param.name, fallback)
                value = setting.at(tensor_name, t) if setting is not None else None
                values.append(param.default if value is None else value)
            kwargs[param.arg] = torch.tensor(values, dtype=torch.float64, device=device)
        else:
            value = fallback.at(tensor_name, t) if fallback is not None else None
            kwargs[param.arg] = param.default if value is None else value
    if method.random:
        generator = torch.Generator(device=device)
        generator.manual_seed(tensor_seed(recipe.seed, tensor_name))
        kwargs["generator"] = generator
    return kwargs


def tensor_seed(seed: int, tensor_name: str) -> int:
    """A seed per tensor, so a tensor's random mask does not depend on the order tensors are merged in."""
    return (seed * 1_000_003 + zlib.crc32(tensor_name.encode())) % (2**63)
