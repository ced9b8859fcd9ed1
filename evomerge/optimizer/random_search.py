"""Uniform random search: the baseline every evolutionary run should beat at the same budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.optimizer.base import Optimizer, Proposal
from evomerge.optimizer.space import SearchSpace


class RandomSearchOptimizer(Optimizer):
    """Float dims uniform within their bounds, binary dims a fair coin; scores are ignored."""

    asks_one_at_a_time = True

    def __init__(
        self,
        *,
        space: SearchSpace,
        n_objectives: int,
        seed: int,
        run_dir: Path | str | None = None,
        batch_size: int = 20,
    ) -> None:
        del run_dir  # the generator's state is all there is to keep
        if batch_size < 1:
            raise EvomergeError(f"optimizer.batch_size is {batch_size}", "Give batch_size >= 1")
        super().__init__(space=space, n_objectives=n_objectives)
        self.batch_size = batch_size
        self._generator = np.random.default_rng(seed)
        self._next_id = 0

    def _ask_generation(self) -> list[Proposal]:
        unit = self._generator.random((self.batch_size, len(self.space)))
        ids = range(self._next_id, self._next_id + self.batch_size)
        self._next_id += self.batch_size
        return [Proposal(id=i, x=x) for i, x in zip(ids, self.space.from_unit(unit), strict=True)]

    def _tell_generation(self, proposals: list[Proposal], scores: np.ndarray, failed: np.ndarray) -> None:
        pass

    def _ask_one(self) -> Proposal:
        unit = self._generator.random((1, len(self.space)))
        self._next_id += 1
        return Proposal(id=self._next_id - 1, x=self.space.from_unit(unit)[0])

    def _tell_one(self, proposal: Proposal, scores: np.ndarray, failed: bool) -> None:
        pass

    def _algorithm_state(self) -> dict[str, Any]:
        return {"generator": self._generator.bit_generator.state, "next_id": self._next_id}

    def _load_algorithm_state(self, state: dict[str, Any]) -> None:
        self._generator.bit_generator.state = state["generator"]
        self._next_id = state["next_id"]
