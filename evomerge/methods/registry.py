"""The registry of merge methods: each method declares its parameters once, here, and nowhere else.

The genome derives its search space from these declarations, recipes are validated against them,
and the mergekit writer uses them to decide what is expressible; there is no second table.
"""

from __future__ import annotations

import keyword
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from evomerge.errors import EvomergeError

Inputs = Literal["tensors", "deltas"]


@dataclass(frozen=True)
class Param:
    """One knob of a merge method.

    ``per_model`` knobs (weight, density, ...) take one value per non-base model and may vary by layer
    (a gradient) and by tensor-name filter; global knobs (lambda, t, normalize, ...) take one value for
    the whole merge (numeric ones may still vary by layer and filter). ``low``/``high`` bound what is
    valid; ``search`` is the range a genome explores by default.
    """

    name: str
    per_model: bool
    default: float | bool | None
    kind: type = float
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    search: tuple[float, float] | None = None

    @property
    def arg(self) -> str:
        """The keyword the method function receives (``lambda`` is a Python keyword: ``lambda_``)."""
        return f"{self.name}_" if keyword.iskeyword(self.name) else self.name

    def check(self, value: float | bool, where: str) -> None:
        """Raise a user-facing error when ``value`` is outside what this parameter allows."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise EvomergeError(
                    f"{where}: parameter '{self.name}' must be true or false, got {value!r}",
                    f"write '{self.name}: true' or '{self.name}: false'",
                )
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise EvomergeError(
                f"{where}: parameter '{self.name}' must be a finite number, got {value!r}",
                f"give '{self.name}' a number{self._range_text()}",
            )
        # Recipes hold numbers as floats (setting.py), so a whole number arrives as 10.0.
        if self.kind is int and not float(value).is_integer():
            raise EvomergeError(
                f"{where}: parameter '{self.name}' must be a whole number, got {value!r}",
                f"give '{self.name}' a whole number{self._range_text()}",
            )
        below = self.low is not None and (value < self.low or (value == self.low and not self.low_inclusive))
        above = self.high is not None and value > self.high
        if below or above:
            raise EvomergeError(
                f"{where}: parameter '{self.name}' = {value} is out of range",
                f"use a value{self._range_text()}",
            )

    def _range_text(self) -> str:
        if self.low is None and self.high is None:
            return ""
        left = ("[" if self.low_inclusive else "(") + (str(self.low) if self.low is not None else "-inf")
        right = (str(self.high) if self.high is not None else "inf") + "]"
        return f" in {left}, {right}"


# The knobs shared across methods, defined once so every method means the same thing by each name.
WEIGHT = Param("weight", per_model=True, default=None, low=None, search=(0.0, 1.5))
DENSITY = Param("density", per_model=True, default=1.0, low=0.0, high=1.0, low_inclusive=False, search=(0.05, 1.0))
# DELLA also needs density - epsilon > 0 and density + epsilon < 1 (unless density is 1); a range per
# parameter cannot say that, so della checks the pair when it runs.
EPSILON = Param("epsilon", per_model=True, default=0.15, low=0.0, high=0.5, search=(0.0, 0.2))
GAMMA = Param("gamma", per_model=True, default=0.01, low=0.0, high=1.0, search=(0.0, 0.1))
# mergekit takes any real lambda: a negative one subtracts the merged task vector (task negation).
# lambda rescales the merged task vector, which the per-model weights already do: searched only when
# a genome asks for it (genome.params) with a range (genome.ranges), so default genomes stay minimal.
LAMBDA = Param("lambda", per_model=False, default=1.0)
T = Param("t", per_model=False, default=None, low=0.0, high=1.0, search=(0.0, 1.0))
NORMALIZE_ON = Param("normalize", per_model=False, default=True, kind=bool)
NORMALIZE_OFF = Param("normalize", per_model=False, default=False, kind=bool)
INT8_MASK = Param("int8_mask", per_model=False, default=False, kind=bool)
RESCALE_ON = Param("rescale", per_model=False, default=True, kind=bool)
RESCALE_OFF = Param("rescale", per_model=False, default=False, kind=bool)
FILTER_WISE = Param("filter_wise", per_model=False, default=False, kind=bool)


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: a pure tensor function plus what it needs.

    ``inputs == "deltas"``: ``fn(base, deltas, **params)`` receives the base tensor and the stacked
    task vectors ``deltas[i] = model_i - base`` (shape ``[N, *shape]``). ``inputs == "tensors"``:
    ``fn(base, tensors, **params)`` receives the stacked raw tensors of the non-base models and the base
    tensor (or None when the method needs no base). Per-model parameters arrive as a 1-D float tensor
    of length N on the inputs' device; global ones as Python scalars. Random methods also receive a
    ``generator``.

    Every method also takes ``out``: a tensor of the base's shape and dtype (not aliasing the inputs)
    to write the merge into, as the in-place path does with a model's parameter; the method returns
    it. Writing there instead of returning a fresh tensor matters: a large fresh tensor is a fresh
    mapping from the OS, whose page faults cost more than the merge itself.

    ``precompute(base, inputs)``, when a method declares one, derives what the method needs from its
    inputs alone, whatever its parameters (TIES: each task vector's magnitudes in sorted order; slerp: the
    cosine between its two inputs). A caller that merges the same resident inputs again and again (the
    in-place path) computes it once and passes it as ``precomputed=``; others pass nothing, and the
    method works it out itself, possibly a cheaper way for a single use. A random method's precompute
    also takes the tensor's ``generator`` (DARE: the draws themselves, which depend on the seed and not
    on the densities), so a caller keeps its result per seed; it may return None where keeping nothing
    is the better deal, and the method then draws per call. ``precompute_bytes(device, dtype, count)``
    bounds what it keeps for ``count`` models: bytes per entry of the merged tensor (what a worker's
    memory check counts).

    ``optional_base`` (with ``needs_base`` false): the method takes the recipe's base where it names one
    and merges without one otherwise (mergekit's nuslerp, multislerp); ``fn`` then gets ``base=None``.

    ``fixed``: keyword arguments this name always passes to ``fn``. Twins share one function and differ in
    one step (dare_ties and dare_linear: ``sign_consensus`` True or False), as mergekit registers its
    generalized task arithmetic variants. Callers run a method through ``merge``, which adds them.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[Param, ...]
    inputs: Inputs
    needs_base: bool
    random: bool
    reference: str
    optional_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    precompute: Callable[..., object] | None = None
    precompute_bytes: Callable[[torch.device, torch.dtype, int], int] = lambda device, dtype, count: 0
    fixed: tuple[tuple[str, object], ...] = ()

    def merge(self, base: torch.Tensor | None, inputs: torch.Tensor, **kwargs: object) -> torch.Tensor:
        """``fn`` with this name's fixed arguments, as every caller runs a method."""
        return self.fn(base, inputs, **dict(self.fixed), **kwargs)

    @property
    def takes_base(self) -> bool:
        """Whether a recipe's base, when it names one, is read as the base (else it takes no part)."""
        return self.needs_base or self.optional_base

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        allowed = ", ".join(p.name for p in self.params) or "none"
        raise EvomergeError(
            f"merge method '{self.name}' has no parameter '{name}'",
            f"use one of its parameters ({allowed}) or pick another method",
        )


_REGISTRY: dict[str, MergeMethod] = {}


def merge_method(
    *,
    name: str,
    reference: str,
    params: tuple[Param, ...],
    inputs: Inputs,
    needs_base: bool,
    random: bool = False,
    optional_base: bool = False,
    min_models: int = 1,
    max_models: int | None = None,
    precompute: Callable[..., object] | None = None,
    precompute_bytes: Callable[[torch.device, torch.dtype, int], int] = lambda device, dtype, count: 0,
    fixed: dict[str, object] | None = None,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register ``fn`` under ``name``; registering a name twice is an error, not an overwrite."""

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in _REGISTRY:
            raise ValueError(f"merge method '{name}' is registered twice ({_REGISTRY[name].fn} and {fn})")
        _REGISTRY[name] = MergeMethod(
            name=name,
            fn=fn,
            params=params,
            inputs=inputs,
            needs_base=needs_base,
            random=random,
            reference=reference,
            optional_base=optional_base,
            min_models=min_models,
            max_models=max_models,
            precompute=precompute,
            precompute_bytes=precompute_bytes,
            fixed=tuple(sorted((fixed or {}).items())),
        )
        return fn

    return register


def written(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``result`` copied into ``out`` when the caller gave one (methods that cannot build their result
    there directly), else ``result`` itself."""
    return result if out is None else out.copy_(result)


def get_method(name: str) -> MergeMethod:
    """The method registered under ``name``, or a user-facing error listing the known ones."""
    if name not in _REGISTRY:
        raise EvomergeError(
            f"unknown merge method '{name}'",
            f"use one of: {', '.join(sorted(_REGISTRY))}",
        )
    return _REGISTRY[name]


def method_names() -> list[str]:
    return sorted(_REGISTRY)
