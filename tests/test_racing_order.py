"""Racing's item order (evomerge/search/racing.py): drawn again for each generation from the run's seed, so
two generations race on different items, and a run killed after any row of a generation resumes to the
log of a run never killed."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.evaluate.lm_eval_scorer import ItemSubset
from evomerge.optimizer.optuna_sampler import TPEOptimizer
from evomerge.search.racing import Race
from evomerge.search.run_folder import RunFolder
from tests.test_racing import ITEMS, ItemScorer, TableScorer, genome, raced_search


def test_an_item_subset_counts_positions_in_the_generations_order():
    assert ItemSubset(metric="t/acc", start=2, stop=5).positions_in(10) == [2, 3, 4]
    assert ItemSubset(metric="t/acc", positions=(7, 1)).positions_in(10) == [7, 1]
    order = np.random.default_rng([3, 1]).permutation(10).tolist()  # the run's seed 3, generation 1
    assert ItemSubset(metric="t/acc", start=2, stop=5, shuffle=(3, 1)).positions_in(10) == order[2:5]
    assert ItemSubset(metric="t/acc", positions=(7, 1), shuffle=(3, 1)).positions_in(10) == [order[7], order[1]]


class Recording(TableScorer):
    """Also records the items of racing order each call asked for, in the generation's order."""

    def __init__(self, table):
        super().__init__(table)
        self.items: list[list[int]] = []

    def __call__(self, recipes, subset):
        self.items.append(subset.positions_in(len(self.table[0])))
        yield from super().__call__(recipes, subset)


def test_two_generations_race_on_different_first_round_items():
    table = [[1.0] * 64, [0.0] * 64]
    first_round = {}
    for generation in (0, 1, 0):
        scorer = Recording(table)
        race = Race(score_items=scorer, metric="toy/acc", first_round=16, delta=0.1, selected=None, seed=7)
        list(race([0, 1], proposals=[], generation=generation))
        first_round.setdefault(generation, []).append(scorer.items[0])
    assert first_round[0][0] == first_round[0][1]  # the same generation: the same items (a resume)
    assert first_round[0][0] == np.random.default_rng([7, 0]).permutation(64)[:16].tolist()
    assert set(first_round[0][0]) != set(first_round[1][0])


class ShuffleRecording(ItemScorer):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.shuffles: set[tuple[int, ...]] = set()

    def __call__(self, recipes, subset):
        self.shuffles.add(subset.shuffle)
        yield from super().__call__(recipes, subset)


def kill_after_row(monkeypatch, index: int) -> None:
    """The process dies right after writing log row ``index``."""
    append = RunFolder.append_evaluation

    def append_then_die(run, row):
        append(run, row)
        if row["index"] == index:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(RunFolder, "append_evaluation", append_then_die)


def tpe():
    return TPEOptimizer(
        space=genome().space, n_objectives=1, seed=0, batch_size=8, n_startup_trials=8, pruner="successive_halving"
    )


@pytest.mark.parametrize(
    ("optimizer", "kill_rows"),
    [(None, range(8, 16)), (tpe, (8, 11, 15))],  # TPE's study is slower to restore: three of the rows
    ids=["cmaes", "tpe-successive-halving"],
)
def test_a_raced_run_killed_after_any_row_of_a_generation_resumes_to_the_identical_log(
    tmp_path, monkeypatch, optimizer, kill_rows
):
    """Generations of 8: rows 8-15 are generation 1's. A resumed race scores again the candidates whose rows
    the killed run logged, so it stops and estimates the others (and reports to optuna's pruner) as the
    straight run did."""

    def search(path, scorer):
        return raced_search(path, scorer, evaluations=24, optimizer=optimizer() if optimizer else None)

    straight = ShuffleRecording()
    search(tmp_path / "straight", straight)
    rows = RunFolder(tmp_path / "straight").read_evaluations()
    assert straight.shuffles == {(0, 0), (0, 1), (0, 2)}  # the loop passes its generation
    assert [r["generation"] for r in rows] == [0] * 8 + [1] * 8 + [2] * 8
    stopped = [r for r in rows[8:16] if r["items"][0] < ITEMS]
    assert stopped and all("toy/acc@prefix" in r["metrics"] for r in stopped)
    for index in kill_rows:
        path = tmp_path / f"killed-after-{index}"
        with monkeypatch.context() as patch:
            kill_after_row(patch, index)
            with pytest.raises(KeyboardInterrupt):
                search(path, ItemScorer())
        assert len(RunFolder(path).read_evaluations()) == index + 1
        search(path, ItemScorer())
        assert RunFolder(path).read_evaluations() == rows, f"killed after row {index}"
