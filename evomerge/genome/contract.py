"""What the search loop needs from a genome, whichever space it searches (parameters or data flow)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from evomerge.optimizer.space import SearchSpace


class Candidate(Protocol):
    """A recipe as the loop handles it: a cache key and a plain row for the evaluation log."""

    def canonical(self) -> str: ...

    def to_plain(self) -> dict: ...


class Genome(Protocol):
    @property
    def dimension(self) -> int: ...

    @property
    def space(self) -> SearchSpace: ...

    def to_recipe(self, x: Sequence[float]) -> Candidate: ...
