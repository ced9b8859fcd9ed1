"""The asynchronous loop (in_flight candidates, one asked per result told) with a known fitness in place of
lm-eval: the same rows whatever order results arrive in, resume after a kill, failures ranked worst."""

from __future__ import annotations

import math

import pytest

from evomerge.errors import EvomergeError
from evomerge.executor.worker import Outcome
from evomerge.optimizer.optuna_sampler import TPEOptimizer
from evomerge.search.loop import Budget, run_search
from evomerge.search.run_folder import RunFolder
from evomerge.search.window import run_window_search
from tests.test_search_checkpoint import drop_checkpoint_at
from tests.test_search_loop import OBJECTIVES, CountingEvaluator, fitness, genome


class ShuffledEvaluator:
    """Scores the candidates available, up to ``spread`` at a time, and returns them last first: a pool
    whose workers finish out of order."""

    def __init__(self, *, spread: int, crash_after: int | None = None) -> None:
        self.spread = spread
        self.crash_after = crash_after
        self.calls = 0

    def __call__(self, recipes):
        position = 0
        while position < len(recipes):
            batch = list(range(position, min(position + self.spread, len(recipes))))
            position = batch[-1] + 1
            for i in reversed(batch):
                if self.calls == self.crash_after:
                    raise KeyboardInterrupt("simulated kill")
                self.calls += 1
                yield i, Outcome(metrics={"toy/acc": fitness(recipes[i])}, error=None, seconds=0.001)


def tpe():
    return TPEOptimizer(space=genome().space, n_objectives=1, seed=4, batch_size=6, n_startup_trials=6)


def search(path, evaluator, *, evaluations=30, in_flight=4, optimizer=None):
    run = RunFolder(path)
    run.lock()
    try:
        return run_window_search(
            run=run,
            genome=genome(),
            optimizer=optimizer or tpe(),
            evaluate=evaluator,
            objectives=OBJECTIVES,
            budget=Budget(evaluations=evaluations),
            in_flight=in_flight,
        )
    finally:
        run.close()


def rows(path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in RunFolder(path).read_evaluations()]


def test_the_order_results_arrive_in_changes_nothing(tmp_path):
    state = search(tmp_path / "in_order", CountingEvaluator())
    search(tmp_path / "shuffled", ShuffledEvaluator(spread=3))
    assert rows(tmp_path / "shuffled") == rows(tmp_path / "in_order")
    assert [r["proposal"] for r in rows(tmp_path / "in_order")] == list(range(30))
    # Checkpoints after every 4 tells: 7 full batches and the last 2 rows.
    assert state.generation == 8 and [r["generation"] for r in rows(tmp_path / "in_order")][-3:] == [6, 7, 7]
    # Past its 6 startup trials TPE models the scores told: the last proposals beat the first ones.
    scores = [r["scores"][0] for r in rows(tmp_path / "in_order")]
    assert max(scores[-12:]) > max(scores[:6])


@pytest.mark.parametrize("crash_after", [2, 9, 17])
@pytest.mark.parametrize("spread", [1, 3])
def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, crash_after, spread):
    search(tmp_path / "straight", CountingEvaluator())
    with pytest.raises(KeyboardInterrupt):
        search(tmp_path / "crashed", ShuffledEvaluator(spread=spread, crash_after=crash_after))
    # Rows are logged in proposal order: results that arrived ahead of an earlier candidate die with the process.
    logged = len(rows(tmp_path / "crashed"))
    assert logged == crash_after if spread == 1 else logged <= crash_after
    resumed = ShuffledEvaluator(spread=spread)
    state = search(tmp_path / "crashed", resumed)
    assert rows(tmp_path / "crashed") == rows(tmp_path / "straight")
    assert state.evaluations == 30 and resumed.calls == 30 - logged  # the logged ones are replayed


def test_a_kill_before_the_checkpoint_landed_replays_the_rows_after_the_one_before(tmp_path, monkeypatch):
    search(tmp_path / "straight", CountingEvaluator())
    with monkeypatch.context() as patch:
        drop_checkpoint_at(patch, 12)  # the third checkpoint (after 12 tells) is lost
        with pytest.raises(KeyboardInterrupt):
            search(tmp_path / "crashed", CountingEvaluator(crash_after=14))
    assert RunFolder(tmp_path / "crashed").load_checkpoint().evaluations == 8
    resumed = CountingEvaluator()
    search(tmp_path / "crashed", resumed)
    assert rows(tmp_path / "crashed") == rows(tmp_path / "straight")
    assert resumed.calls == 30 - 14  # what was scored before the kill is replayed, not scored again


def test_failed_candidates_are_told_a_finite_penalty(tmp_path):
    optimizer = tpe()
    search(tmp_path / "run", CountingEvaluator(nan_every=3), evaluations=12, optimizer=optimizer)
    logged = rows(tmp_path / "run")
    assert [r["scores"] == [None] for r in logged] == [i % 3 == 2 for i in range(12)]
    told = [t["values"][0] for t in optimizer.state_dict()["algorithm"]["trials"]]
    worst_real = min(r["scores"][0] for r in logged if r["scores"] != [None])
    assert all(math.isfinite(v) for v in told)
    assert all(v < worst_real for v, r in zip(told, logged, strict=True) if r["scores"] == [None])


def test_a_run_checkpointed_with_candidates_in_flight_is_not_resumed_by_the_generation_loop(tmp_path):
    """Switching an asynchronous run to generations (in_flight=null, --force) would have to drop or re-ask
    the candidates in flight: refused with the way out, the run folder untouched."""
    with pytest.raises(KeyboardInterrupt):
        search(tmp_path / "run", ShuffledEvaluator(spread=1, crash_after=9))
    before = rows(tmp_path / "run")
    run = RunFolder(tmp_path / "run")
    run.lock()
    try:
        with pytest.raises(EvomergeError, match="with 3 candidates in flight") as caught:
            run_search(
                run=run,
                genome=genome(),
                optimizer=tpe(),
                evaluate=CountingEvaluator(),
                objectives=OBJECTIVES,
                budget=Budget(evaluations=30),
            )
    finally:
        run.close()
    assert "resume with the in_flight value" in str(caught.value)
    assert rows(tmp_path / "run") == before
    search(tmp_path / "run", CountingEvaluator())  # resumed as it was started, it finishes
    search(tmp_path / "straight", CountingEvaluator())
    assert rows(tmp_path / "run") == rows(tmp_path / "straight")
