"""The non-dominated set of evaluated candidates, all objectives maximized; the search loop keeps one."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class FrontMember:
    id: int
    scores: tuple[float, ...]


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """True when `a` is at least as good as `b` in every objective and better in one (maximizing)."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))


class ParetoFront:
    """Candidates no other added candidate dominates, in the order they were added.

    Ties (equal score tuples) all stay. A non-finite score counts as -inf, the worst possible, so a
    failed candidate leaves the front as soon as anything finite beats it; NaN would otherwise compare
    false both ways and never be dominated.
    """

    def __init__(self, *, n_objectives: int) -> None:
        if n_objectives < 1:
            raise ValueError(f"n_objectives must be >= 1, got {n_objectives}")
        self.n_objectives = n_objectives
        self._members: list[FrontMember] = []
        self._added_ids: set[int] = set()

    def add(self, *, id: int, scores: Sequence[float | None]) -> bool:
        """Offer a candidate; returns whether it is on the front now."""
        if id in self._added_ids:
            raise ValueError(f"candidate {id} was already added to the front")
        if len(scores) != self.n_objectives:
            raise ValueError(f"expected {self.n_objectives} scores for candidate {id}, got {len(scores)}")
        worst_if_failed = tuple(float(s) if s is not None and math.isfinite(s) else -math.inf for s in scores)
        self._added_ids.add(id)
        if any(dominates(member.scores, worst_if_failed) for member in self._members):
            return False
        self._members = [m for m in self._members if not dominates(worst_if_failed, m.scores)]
        self._members.append(FrontMember(id=id, scores=worst_if_failed))
        return True

    @property
    def members(self) -> tuple[FrontMember, ...]:
        return tuple(self._members)

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(member.id for member in self._members)

    def __len__(self) -> int:
        return len(self._members)

    def state_dict(self) -> dict[str, Any]:
        return {
            "n_objectives": self.n_objectives,
            "members": [[member.id, list(member.scores)] for member in self._members],
            "added_ids": sorted(self._added_ids),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["n_objectives"] != self.n_objectives:
            raise ValueError(f"front state has {state['n_objectives']} objectives, this front {self.n_objectives}")
        self._members = [FrontMember(id=id, scores=tuple(scores)) for id, scores in state["members"]]
        self._added_ids = set(state["added_ids"])
