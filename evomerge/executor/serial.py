"""Run candidates one after another in this process, on one device."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from evomerge.executor.worker import Outcome, Worker, WorkerSpec
from evomerge.recipe.recipe import Recipe


class SerialExecutor:
    def __init__(self, *, spec: WorkerSpec, threads: int | None = None) -> None:
        if threads is not None:
            # On a shared CPU, fewer torch threads can be faster: one thread ran the toy model's
            # forward pass 4x faster than two on a 2-core box busy with other work.
            torch.set_num_threads(threads)
        self.worker = Worker(spec)

    def evaluate(self, recipes: list[Recipe]) -> Iterator[tuple[int, Outcome]]:
        """Yield ``(position, outcome)`` as each candidate is scored, so the loop can log it at once.
        Candidates appended to ``recipes`` meanwhile are scored too (a list iterator sees them)."""
        for position, recipe in enumerate(recipes):
            yield position, self.worker.evaluate(recipe)

    def close(self) -> None:
        self.worker = None
