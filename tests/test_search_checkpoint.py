"""The checkpoint is written on a thread while the next generation runs: a kill that lands before the
write leaves the checkpoint of the generation before, and the resume must still match a straight run."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from evomerge.search.run_folder import RunFolder
from tests.test_search_loop import CountingEvaluator, RandomSearchOptimizer, genome, search


def drop_checkpoint_at(monkeypatch, evaluations: int) -> None:
    """The checkpoint that would count ``evaluations`` rows never lands, as if the process died first."""
    save = RunFolder.save_checkpoint

    def save_unless_dropped(run, pickled):
        if pickle.loads(pickled).evaluations != evaluations:
            save(run, pickled)

    monkeypatch.setattr(RunFolder, "save_checkpoint", save_unless_dropped)


def rows(path) -> list[dict]:
    return RunFolder(path).read_evaluations()


def test_a_kill_before_the_checkpoint_landed_replays_two_generations(tmp_path, monkeypatch):
    search(tmp_path / "straight", CountingEvaluator())
    with monkeypatch.context() as patch:
        drop_checkpoint_at(patch, 16)  # generations of 8: the checkpoint after the second is lost
        with pytest.raises(KeyboardInterrupt):
            search(tmp_path / "crashed", CountingEvaluator(crash_after=20))
    assert RunFolder(tmp_path / "crashed").load_checkpoint().evaluations == 8
    assert len(rows(tmp_path / "crashed")) == 20
    resumed = CountingEvaluator()
    search(tmp_path / "crashed", resumed)
    assert rows(tmp_path / "crashed") == rows(tmp_path / "straight")  # every field, seconds included
    assert resumed.calls == 48 - 20  # the 12 rows past the checkpoint were replayed, not scored again


class Repeating(RandomSearchOptimizer):
    """Each generation proposes one point four times: one evaluation, then three cache hits."""

    def _ask_generation(self):
        proposals = super()._ask_generation()
        return [type(p)(id=p.id, x=proposals[0].x) for p in proposals]


def test_a_replayed_candidate_takes_its_evaluated_row_not_a_cache_hit(tmp_path, monkeypatch):
    def optimizer():
        return Repeating(space=genome().space, n_objectives=1, seed=0, batch_size=4)

    search(tmp_path / "straight", CountingEvaluator(), optimizer=optimizer(), evaluations=12)
    with monkeypatch.context() as patch:
        drop_checkpoint_at(patch, 8)
        with pytest.raises(KeyboardInterrupt):
            search(tmp_path / "crashed", CountingEvaluator(crash_after=2), optimizer=optimizer(), evaluations=12)
    # Generation 1's four rows are past the checkpoint: the first scored in 0.001 s, three hits in 0 s.
    assert [r["seconds"] for r in rows(tmp_path / "crashed")[4:]] == [0.001, 0.0, 0.0, 0.0]
    search(tmp_path / "crashed", CountingEvaluator(), optimizer=optimizer(), evaluations=12)
    assert rows(tmp_path / "crashed") == rows(tmp_path / "straight")


class Constant(RandomSearchOptimizer):
    """Proposes the centre of the box every time: one evaluation, then cache hits only."""

    def _ask_generation(self):
        return [type(p)(id=p.id, x=np.full(len(self.space), 0.5)) for p in super()._ask_generation()]


def test_the_cache_is_rebuilt_from_the_log_not_read_from_the_checkpoint(tmp_path):
    def optimizer():
        return Constant(space=genome().space, n_objectives=1, seed=0, batch_size=4)

    search(tmp_path / "run", CountingEvaluator(), optimizer=optimizer(), evaluations=8)
    assert RunFolder(tmp_path / "run").load_checkpoint().cache == {}  # it would grow with every generation
    resumed = CountingEvaluator()
    state = search(tmp_path / "run", resumed, optimizer=optimizer(), evaluations=16)
    assert resumed.calls == 0
    assert [r["cached"] for r in rows(tmp_path / "run")] == [False] + [True] * 15
    assert list(state.cache) == [rows(tmp_path / "run")[0]["key"]]
