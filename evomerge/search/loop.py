"""The search loop: ask a generation, score the new candidates, tell, checkpoint. Read top to bottom.
(`window.py` is its asynchronous variant, for optimizers that ask one candidate at a time.)

Resume is exact because the loop is deterministic given the checkpoint: the optimizer's state and
the generation counter are saved together after each generation (the evaluation cache is rebuilt
from the rows of the log that the checkpoint counts), and candidates scored after the last
checkpoint (by a process that was killed) are asked again and take their logged scores instead of
being evaluated twice.

The checkpoint is written (its fsyncs included) on a thread while the next generation runs, so the
workers do not wait on the disk. A kill before it lands leaves the checkpoint before it: the resumed
run then replays the logged rows of two generations instead of one, with the same result.
"""

from __future__ import annotations

import math
import pickle
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.evaluate.lm_eval_scorer import weighted_sum
from evomerge.executor.worker import Outcome
from evomerge.genome.contract import Candidate, Genome
from evomerge.optimizer.base import Optimizer, Proposal
from evomerge.optimizer.pareto import ParetoFront
from evomerge.recipe.canonical import canonical_key
from evomerge.search.progress import Progress
from evomerge.search.run_folder import RunFolder, fully_scored
from evomerge.search.state import Best, SearchState


@dataclass(frozen=True)
class Budget:
    evaluations: int | None = None
    wall_time_s: float | None = None
    fail_fast: int | None = 3  # stop when the first this many candidates scored fail with one error

    def watch_failures(self, run: RunFolder) -> FailFast:
        return FailFast(count=self.fail_fast, run=run)

    def spent(self, state: SearchState) -> bool:
        over_count = self.evaluations is not None and state.evaluations >= self.evaluations
        over_time = self.wall_time_s is not None and state.elapsed_s >= self.wall_time_s
        return over_count or over_time


@dataclass
class FailFast:
    """Stops a search whose first ``count`` candidates scored by this process all raised the same error.

    An error every candidate hits (a task that cannot load, a missing package, a wrong metric name) would
    otherwise rank every candidate worst and burn the whole budget. Only candidates scored by this
    process count, not rows a resume replays from the log, so a resume after fixing the cause goes on;
    the failed candidates stay in the log, ranked worst. Non-finite metrics (a genuinely bad candidate)
    are not errors here: they are ranked worst and the search goes on.
    """

    count: int | None
    run: RunFolder
    errors: list[str | None] = field(default_factory=list)

    def saw(self, outcome: Outcome) -> None:
        if self.count is None or len(self.errors) >= self.count:
            return
        self.errors.append(outcome.error if outcome.metrics is None else None)
        first_lines = {error.splitlines()[0] if error else None for error in self.errors}
        if len(self.errors) == self.count and None not in first_lines and len(first_lines) == 1:
            raise EvomergeError(
                f"the first {self.count} candidates all failed with the same error, so the rest would too:\n"
                f"{self.errors[-1]}\n",
                f"fix its cause, then continue with `evomerge resume {self.run.path}` (the failed candidates stay "
                "in the log, ranked worst); budget.fail_fast=null turns this check off",
            )


def run_search(
    *,
    run: RunFolder,
    genome: Genome,
    optimizer: Optimizer,
    evaluate: Callable[..., Iterator[tuple[int, Outcome]]],
    objectives: list[dict],
    budget: Budget,
    watchers: Sequence = (),
) -> SearchState:
    """Drive the search until the budget is spent, checkpointing after every generation; ``watchers`` see
    its events (progress.py)."""
    state, replay = resume_state(run, optimizer, n_objectives=len(objectives), by_generation=True)
    names = [o["name"] for o in objectives]
    progress = Progress(objectives=names, budget=budget.evaluations, start=state, watchers=watchers)
    failures = budget.watch_failures(run)
    saved: Future | None = None
    with ThreadPoolExecutor(max_workers=1) as writer:  # leaving it waits for the last checkpoint write
        while not budget.spent(state):
            started = time.perf_counter()
            proposals = optimizer.ask()
            recipes = [genome.to_recipe(p.x) for p in proposals]
            keys = [r.canonical() for r in recipes]

            whole_generation = getattr(evaluate, "whole_generation", False)
            if whole_generation:
                _replay_whole_generations(keys, state, replay, replayable=evaluate.replays_whole_generations)
            fresh = [i for i, k in enumerate(keys) if k not in state.cache and k not in replay and k not in keys[:i]]
            arrived: dict[str, Outcome] = {}
            scores: list[tuple[float, ...]] = []
            # Rows are logged in proposal order as soon as every earlier row is ready, so a kill loses
            # at most the candidates still in flight.
            _log_ready(run, state, proposals, recipes, keys, arrived, replay, objectives, scores, progress)
            batch = [recipes[i] for i in fresh]
            if whole_generation:
                # A race also needs the proposals (optuna's pruner reports to their trials), and both the
                # generation (its item order, what an estimate has learned by then).
                scored = evaluate(batch, [proposals[i] for i in fresh], generation=state.generation)
            else:
                scored = evaluate(batch)
            for position, outcome in scored:
                arrived[keys[fresh[position]]] = outcome
                _log_ready(run, state, proposals, recipes, keys, arrived, replay, objectives, scores, progress)
                failures.saw(outcome)
            _log_ready(run, state, proposals, recipes, keys, arrived, replay, objectives, scores, progress)

            optimizer.tell(proposals, scores)
            _, saved = close_batch(run, state, optimizer, scores, started, saved, writer, progress)
        if saved is not None:
            saved.result()
    progress.close(state)
    return state


def close_batch(
    run: RunFolder,
    state: SearchState,
    optimizer: Optimizer,
    scores: list[tuple[float, ...]],
    started: float,
    saved: Future | None,
    writer: ThreadPoolExecutor,
    progress: Progress,
) -> tuple[float, Future]:
    """Close a batch of told ``scores`` (a generation, or ``in_flight`` tells): history, counters, the
    search time since ``started``, and the checkpoint handed to the writer thread. Returns (now, its future)."""
    finite = [s[0] for s in scores if math.isfinite(s[0])]
    state.history.append(
        {
            "generation": state.generation,
            "best": state.best.scores[0] if state.best else math.nan,
            "mean": float(np.mean(finite)) if finite else math.nan,
        }
    )
    state.generation += 1
    now = time.perf_counter()
    state.elapsed_s += now - started
    state.optimizer = optimizer.state_dict()
    if saved is not None:
        saved.result()  # one write at a time, in order; its error surfaces here
    saved = writer.submit(run.save_checkpoint, checkpoint_bytes(state))
    progress.generation_done(state)
    return now, saved


def resume_state(
    run: RunFolder, optimizer: Optimizer, *, n_objectives: int, by_generation: bool = False
) -> tuple[SearchState, dict[str, dict]]:
    """The run's state from its checkpoint (the optimizer loaded with it), or a fresh one; and the rows
    logged past the checkpoint, by key, for the candidates the resumed run will ask again.
    ``by_generation``: for the generation loop, which cannot take over candidates the asynchronous
    loop left in flight (refused before the log is touched)."""
    state = run.load_checkpoint()
    if state is None:
        state = SearchState(optimizer=optimizer.state_dict(), front=ParetoFront(n_objectives=n_objectives))
    else:
        optimizer.load_state_dict(state.optimizer)
    if by_generation and optimizer.in_flight():
        raise EvomergeError(
            f"'{run.path}' was checkpointed by the asynchronous loop with {len(optimizer.in_flight())} candidates in "
            "flight, which the generation loop (in_flight=null) cannot take over",
            "resume with the in_flight value the run was started with (see its config.yaml)",
        )
    kept, dropped = run.truncate_evaluations(state.evaluations)
    # Keys are computed again from each row's recipe, so a log written with another key format (one line
    # of YAML, before evomerge 0.2) resumes exactly.
    state.cache = {canonical_key(row["recipe"]): _cached(row) for row in kept if not row["cached"]}
    replay: dict[str, dict] = {}
    for row in dropped:
        replay.setdefault(canonical_key(row["recipe"]), row)  # the evaluated row; later ones with its key were hits
    return state, replay


def _replay_whole_generations(
    keys: list[str], state: SearchState, replay: dict[str, dict], *, replayable: bool
) -> None:
    """An evaluator that scores a generation as a whole (a race, an estimate) decides each candidate's items
    and value from all of them together. A killed process may have logged only some of a generation's rows:
    replaying those and scoring the rest apart would give other values than the uninterrupted run. Such a
    generation is scored again whole (the same draws, so the same rows); one logged whole is replayed where
    the evaluator is ``replayable`` (a race that reports to optuna's pruner is not: its trials must hear
    the rounds again)."""
    scored = [k for i, k in enumerate(keys) if k not in state.cache and k not in keys[:i]]
    if not replayable or not all(k in replay for k in scored):
        for k in scored:
            replay.pop(k, None)


def _log_ready(run, state, proposals, recipes, keys, arrived, replay, objectives, scores, progress) -> None:
    """Log (and cache) the next rows of this generation whose scores are known; append to ``scores``."""
    while len(scores) < len(proposals):
        i = len(scores)
        score = log_row(run, state, proposals[i], recipes[i], keys[i], arrived, replay, objectives, progress)
        if score is None:
            return
        scores.append(score)


def log_row(
    run: RunFolder,
    state: SearchState,
    proposal: Proposal,
    recipe: Candidate,
    key: str,
    arrived: dict[str, Outcome],
    replay: dict[str, dict],
    objectives: list[dict],
    progress: Progress,
) -> tuple[float, ...] | None:
    """Log (and cache) this candidate's row and return its scores, if they are known: from the cache, a
    row logged before a resume, or an outcome ``arrived`` from the executor; else None."""
    cached = key in state.cache
    items = None  # racing: [items scored, items in the task]
    worker = None  # which worker scored it (executor/worker.py); None for a cache hit
    if cached:
        score, metrics, error, items = state.cache[key]
        seconds = 0.0
    elif key in replay:
        row = replay.pop(key)
        score, metrics, error, seconds = _scores(row["scores"]), row["metrics"], row["error"], row["seconds"]
        items, worker = row.get("items"), row.get("worker")
    elif key in arrived:
        outcome = arrived.pop(key)
        metrics, error, seconds, worker = outcome.metrics, outcome.error, outcome.seconds, outcome.worker
        score = _objective_scores(metrics, error, objectives)
        state.evaluating_s += seconds
        if outcome.item_values is not None:
            items = [len(outcome.item_values), outcome.items_total]
    else:
        return None
    state.cache[key] = (score, metrics, error, items)
    row = {
        "index": state.evaluations,
        "generation": state.generation,
        "proposal": proposal.id,
        "key": key,
        "recipe": recipe.to_plain(),
        "scores": [s if math.isfinite(s) else None for s in score],
        "metrics": metrics,
        "error": error,
        "cached": cached,
        "seconds": seconds,
        "worker": worker,
    }
    if items is not None:
        row["items"] = items
    run.append_evaluation(row)
    _update_best(state, row, score)
    state.evaluations += 1
    progress.candidate(row, state)
    return score


def checkpoint_bytes(state: SearchState) -> bytes:
    """The state pickled without its evaluation cache, which grows with the run and would be pickled
    again every generation on the driver; a resume rebuilds it from the log's rows (`_cached`)."""
    return pickle.dumps(replace(state, cache={}))


def _cached(row: dict) -> tuple[tuple[float, ...], dict[str, float] | None, str | None, list[int] | None]:
    return _scores(row["scores"]), row["metrics"], row["error"], row.get("items")


def _objective_scores(metrics: dict[str, float] | None, error: str | None, objectives: list[dict]) -> tuple[float, ...]:
    if metrics is None or error is not None:
        return tuple(-math.inf for _ in objectives)
    values = (weighted_sum(metrics, dict(o["terms"])) for o in objectives)
    return tuple(v if math.isfinite(v) else -math.inf for v in values)


def _scores(logged: list[float | None]) -> tuple[float, ...]:
    return tuple(-math.inf if s is None else float(s) for s in logged)


def _update_best(state: SearchState, row: dict, score: tuple[float, ...]) -> None:
    if not all(math.isfinite(s) for s in score):
        return
    if not fully_scored(row):
        return  # an estimate (racing.py, estimate.py), told to the optimizer but never a result
    state.front.add(id=row["index"], scores=score)
    if state.best is None or score[0] > state.best.scores[0]:
        state.best = Best(index=row["index"], recipe=row["recipe"], scores=score, metrics=row["metrics"])
