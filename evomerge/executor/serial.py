"""Run candidates one after another in this process, on one device."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from evomerge.errors import EvomergeError
from evomerge.evaluate.lm_eval_scorer import ItemSubset
from evomerge.executor.worker import DeviceFailure, Outcome, Worker, WorkerSpec
from evomerge.recipe.recipe import Recipe


class SerialExecutor:
    def __init__(
        self, *, spec: WorkerSpec, threads: int | None = None, on_worker: Callable[[dict], None] | None = None
    ) -> None:
        """``on_worker``: called with each worker's ``Worker.started`` (its name and memory-tier line)."""
        if threads is not None:
            # On a shared CPU, fewer torch threads can be faster: one thread ran the toy model's
            # forward pass 4x faster than two on a 2-core box busy with other work.
            torch.set_num_threads(threads)
        self.worker = Worker(spec)
        if on_worker is not None:
            on_worker(self.worker.started)

    def evaluate(self, recipes: list[Recipe], subset: ItemSubset | None = None) -> Iterator[tuple[int, Outcome]]:
        """Yield ``(position, outcome)`` as each candidate is scored, so the loop can log it at once.
        Candidates appended to ``recipes`` meanwhile are scored too (a list iterator sees them).
        ``subset``: score only those items of the raced metric (racing)."""
        for position, recipe in enumerate(recipes):
            try:
                outcome = self.worker.evaluate(recipe, subset)
            except DeviceFailure as failure:
                raise EvomergeError(
                    f"the device failed while scoring a candidate ({failure}); after a CUDA error this process "
                    "cannot use the GPU again",
                    "resume the run (`evomerge resume RUN_DIR`): it scores that candidate again in a fresh process. "
                    "If it fails there too, free GPU memory (dtype=bfloat16, fewer models, a smaller lm-eval batch), "
                    "or use executor=ray, which restarts a failed worker and after executor.max_tries scores the "
                    "candidate worst",
                ) from failure
            yield position, outcome

    def score_models(self, refs: list[str], subset: ItemSubset) -> Iterator[list[float]]:
        """Each model's values on ``subset``'s items, in the order of ``refs``, scored by the worker."""
        for ref in refs:
            yield self.worker.score_model(ref, subset)

    def close(self) -> None:
        self.worker = None
