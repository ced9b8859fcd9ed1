"""The search space an optimizer sees: an ordered tuple of float and binary dimensions.

The genome builds it; optimizers only read it. Every backend works in the unit box [0, 1]^d and maps
to the space with `from_unit`, so step sizes (CMA-ES sigma0) mean the same thing in every dimension.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from evomerge.errors import EvomergeError


@dataclass(frozen=True, kw_only=True)
class FloatDim:
    """A real-valued dimension searched within [low, high]."""

    name: str
    low: float
    high: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise EvomergeError(
                f"search dimension {self.name!r} has bounds low={self.low}, high={self.high}",
                "Give finite bounds with low < high",
            )


@dataclass(frozen=True, kw_only=True)
class BinaryDim:
    """An on/off dimension (a DFS layer indicator); proposals carry it as exactly 0.0 or 1.0."""

    name: str


Dim = FloatDim | BinaryDim


class SearchSpace:
    """An ordered tuple of dimensions; treat it as immutable (optimizers derive their bounds from it once).

    A plain class rather than a dataclass on purpose: `hydra.utils.instantiate` turns dataclass
    instances passed as keyword arguments into DictConfigs, and the search loop passes the space that way.
    """

    def __init__(self, *, dims: Sequence[Dim], start: Sequence[float] | None = None) -> None:
        dims = tuple(dims)
        if not dims:
            raise EvomergeError("the search space has no dimensions", "Give the genome something to search")
        for dim in dims:
            if not isinstance(dim, FloatDim | BinaryDim):
                raise TypeError(f"a search dimension must be FloatDim or BinaryDim, got {dim!r}")
        names = [dim.name for dim in dims]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise EvomergeError(
                f"the search space names dimensions {duplicates} more than once",
                "Give each dimension a unique name",
            )
        self.dims: tuple[Dim, ...] = dims
        # The unit-box point a search starts around (CMA-ES's x0); None: the centre of the box.
        self.start: np.ndarray | None = None
        if start is not None:
            self.start = np.asarray(start, dtype=float)
            if self.start.shape != (len(dims),) or not np.all((self.start >= 0.0) & (self.start <= 1.0)):
                raise ValueError(f"a start point needs {len(dims)} values in [0, 1], got {start!r}")

    def __len__(self) -> int:
        return len(self.dims)

    def __iter__(self) -> Iterator[Dim]:
        return iter(self.dims)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SearchSpace) and self.dims == other.dims

    def __hash__(self) -> int:
        return hash(self.dims)

    def __repr__(self) -> str:
        return f"SearchSpace(dims={self.dims!r})"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(dim.name for dim in self.dims)

    @property
    def is_binary(self) -> np.ndarray:
        return np.array([isinstance(dim, BinaryDim) for dim in self.dims])

    @property
    def low(self) -> np.ndarray:
        return np.array([dim.low if isinstance(dim, FloatDim) else 0.0 for dim in self.dims])

    @property
    def high(self) -> np.ndarray:
        return np.array([dim.high if isinstance(dim, FloatDim) else 1.0 for dim in self.dims])

    def from_unit(self, unit: np.ndarray) -> np.ndarray:
        """Map points of the unit box (shape (..., d)) into the space; binary dims threshold at 0.5.

        Thresholding a continuous variable is how Akiba et al. (2024) search DFS layer indicators with
        CMA-ES; at the midpoint, a uniform draw becomes a fair coin.
        """
        unit = np.asarray(unit, dtype=float)
        low, high = self.low, self.high
        # Clip: low + 1.0 * (high - low) can round past high.
        x = np.clip(low + unit * (high - low), low, high)
        return np.where(self.is_binary, (unit >= 0.5).astype(float), x)
