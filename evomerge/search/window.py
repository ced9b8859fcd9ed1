"""The asynchronous search loop: ``in_flight`` candidates out at once, a new one asked as the oldest is told.

For optimizers that ask one candidate at a time (`Optimizer.asks_one_at_a_time`). With a pool of
workers, a worker that finishes takes the next candidate at once instead of waiting, as in a
generation, for the slowest candidate of its batch.

The search stays deterministic whatever order the workers finish in: results are told in proposal
order (one that arrives early waits for those before it), and candidate k is asked right after
candidate k - in_flight is told. That sequence of asks and tells, so every proposal, is the same with
the serial executor, with any pool, and across a kill: the checkpoint, taken after every ``in_flight``
tells and before the ask that follows, holds the optimizer with its candidates in flight, and rows
logged after it are replayed as in `loop.py`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from evomerge.executor.worker import Outcome
from evomerge.genome.contract import Candidate, Genome
from evomerge.optimizer.base import Optimizer, Proposal
from evomerge.search.loop import Budget, close_batch, log_row, resume_state
from evomerge.search.progress import Progress
from evomerge.search.run_folder import RunFolder
from evomerge.search.state import SearchState


@dataclass(frozen=True)
class _Slot:
    proposal: Proposal
    recipe: Candidate
    key: str


def run_window_search(
    *,
    run: RunFolder,
    genome: Genome,
    optimizer: Optimizer,
    evaluate: Callable[[list[Candidate]], Iterator[tuple[int, Outcome]]],
    objectives: list[dict],
    budget: Budget,
    in_flight: int,
    watchers: Sequence = (),
) -> SearchState:
    """Drive the search until the budget is spent, checkpointing after every ``in_flight`` tells; ``watchers``
    see its events (progress.py)."""
    state, replay = resume_state(run, optimizer, n_objectives=len(objectives))
    names = [o["name"] for o in objectives]
    progress = Progress(objectives=names, budget=budget.evaluations, start=state, watchers=watchers)
    window: deque[_Slot] = deque()  # asked, not told, in proposal order
    recipes: list[Candidate] = []  # handed to the executor, which scores those appended while it runs
    keys: list[str] = []  # of recipes, position by position
    scoring: set[str] = set()  # keys handed to the executor and not logged yet
    arrived: dict[str, Outcome] = {}
    told: list[tuple[float, ...]] = []  # scores told since the last checkpoint
    failures = budget.watch_failures(run)
    clock = time.perf_counter()

    def enter(proposal: Proposal) -> None:
        recipe = genome.to_recipe(proposal.x)
        key = recipe.canonical()
        window.append(_Slot(proposal=proposal, recipe=recipe, key=key))
        if key not in state.cache and key not in replay and key not in scoring:
            scoring.add(key)
            recipes.append(recipe)
            keys.append(key)

    def asking() -> bool:
        over_count = budget.evaluations is not None and state.evaluations + len(window) >= budget.evaluations
        spent_s = state.elapsed_s + time.perf_counter() - clock
        return not over_count and (budget.wall_time_s is None or spent_s < budget.wall_time_s)

    def settle() -> tuple[float, ...] | None:
        head = window[0]
        return log_row(run, state, head.proposal, head.recipe, head.key, arrived, replay, objectives, progress)

    for proposal in optimizer.in_flight():  # a resumed run's window, as the checkpoint left it
        enter(proposal)
    results = evaluate(recipes)
    saved: Future | None = None
    with ThreadPoolExecutor(max_workers=1) as writer:  # leaving it waits for the last checkpoint write
        while True:
            # Ask before telling: the first window, or a resumed one, which the checkpoint left one short.
            while len(window) < in_flight and asking():
                enter(optimizer.ask_one())
            while window and (score := settle()) is not None:
                slot = window.popleft()
                scoring.discard(slot.key)
                optimizer.tell_one(slot.proposal, score)
                told.append(score)
                if len(told) == in_flight:
                    clock, saved = close_batch(run, state, optimizer, told, clock, saved, writer, progress)
                    told.clear()
                while len(window) < in_flight and asking():
                    enter(optimizer.ask_one())
            if not window:
                break
            try:
                position, outcome = next(results)
            except StopIteration:
                raise RuntimeError("the executor stopped while candidates were still being scored") from None
            arrived[keys[position]] = outcome
            failures.saw(outcome)
        if told:
            clock, saved = close_batch(run, state, optimizer, told, clock, saved, writer, progress)
        if saved is not None:
            saved.result()
    progress.close(state)
    return state
