"""Paired racing (evomerge/search/racing.py): the stopping rule worked by hand, a race through the real
search loop, and a run killed mid-race that resumes to the identical log."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.errors import EvomergeError
from evomerge.executor.worker import Outcome
from evomerge.optimizer.cmaes import CMAESOptimizer
from evomerge.optimizer.optuna_sampler import TPEOptimizer
from evomerge.search.loop import Budget, run_search
from evomerge.search.racing import Race, full_scale, half_width, round_count, still_running
from evomerge.search.run_folder import RunFolder
from tests.test_search_loop import OBJECTIVES, fitness, genome


class TableScorer:
    """Per-item values from a table, one row per candidate (candidates are the row numbers), each row listed
    in the order the race draws for the generation."""

    def __init__(self, table: list[list[float]]) -> None:
        self.table = table
        self.scored: list[tuple[int, int, int]] = []  # (candidate, start, stop)

    def __call__(self, recipes, subset):
        for position, candidate in enumerate(recipes):
            self.scored.append((candidate, subset.start, subset.stop))
            values = self.table[candidate][subset.start : subset.stop]
            yield (
                position,
                Outcome(
                    metrics=None, error=None, seconds=0.0, item_values=values, items_total=len(self.table[candidate])
                ),
            )


A = [1.0] * 38 + [0.0] * 2  # right on every item of round 1 (20 items), 0.95 over all 40
B = [1.0, 0.0] * 20  # right on every other item: 0.5
C = [1.0, 1.0] + [0.0] * 18 + [1.0, 1.0] + [0.0] * 18  # right on 2 of the 20 of round 1: 0.1


def test_a_candidate_surely_beaten_in_round_one_is_dropped():
    """Worked by hand. 3 candidates, 40 items, rounds of 20 then 40 (R = 2), delta = 0.1, CMA's mu = 1.
    Union bound: 3 pairs x 2 rounds, delta' = 0.1 / 6, x = ln(3 / delta') = ln(180) = 5.193.
    After round 1 (n = 20): A - C has mean 0.9 and mean square 0.9; the bound on the mean square,
    (sqrt(x / 40) + sqrt(x / 40 + 0.9))^2 = (0.3603 + 1.0148)^2 > 1, is capped at 1, so the half width is
    sqrt(2 x / 20) + 2 x / 60 = 0.7206 + 0.1731 = 0.8937 < 0.9: A surely beats C.
    A - B (mean 0.5) and B - C (mean (9 - 1) / 20 = 0.4) are open at that width or wider.
    C surely loses to 1 >= mu candidates, so it is not a parent, and it cannot be the best: dropped.
    A surely beats 1 < K - mu = 2 candidates and loses to none: running, as is B."""
    assert round_count(40, 20) == 2
    assert half_width(20, 0.9, 0.1 / 6) == pytest.approx(0.8937, abs=1e-4)
    values = [A[:20], B[:20], C[:20]]
    assert still_running(values, total=40, selected=1, delta=0.1, rounds=2) == [True, True, False]
    # With mu = 2, C still surely loses to A (1 < mu) but its parenthood is open: it runs on.
    assert still_running(values, total=40, selected=2, delta=0.1, rounds=2) == [True, True, True]


def test_the_race_tells_a_stopped_candidate_the_references_mean_plus_the_paired_difference():
    """C stops after 20 items (above). A and B are scored on all 40: A's mean 0.95 is the highest, so A is
    the reference. C is told A's mean over every item plus C - A over the 20 items they share:
    0.95 + (0.1 - 1.0) = 0.05, not its own mean over its 20 items (0.1, kept as toy/acc@prefix)."""
    scorer = TableScorer([A, B, C])
    race = Race(score_items=scorer, metric="toy/acc", first_round=20, delta=0.1, selected=1, seed=0)
    outcomes = dict(race([0, 1, 2], proposals=[], generation=0))  # proposals: read by a pruner only
    assert scorer.scored == [(0, 0, 20), (1, 0, 20), (2, 0, 20), (0, 20, 60), (1, 20, 60)]
    assert outcomes[0].metrics == {"toy/acc": pytest.approx(0.95)}
    assert outcomes[1].metrics == {"toy/acc": pytest.approx(0.5)}
    assert outcomes[2].metrics == {"toy/acc": pytest.approx(0.05), "toy/acc@prefix": pytest.approx(0.1)}
    assert [len(outcomes[i].item_values) for i in range(3)] == [40, 40, 20]
    assert full_scale([A, B, C[:20]], 40) == pytest.approx([0.95, 0.5, 0.05])


ITEMS = 512
THRESHOLDS = np.random.default_rng(0).random(ITEMS)  # item k is right iff THRESHOLDS[k] < the candidate's p


class ItemScorer:
    """Per-item correctness for the known fitness: p = 1 + fitness (at most 1, at the peak)."""

    def __init__(self, *, crash_after: int | None = None) -> None:
        self.calls = 0
        self.crash_after = crash_after
        self.items = 0

    def __call__(self, recipes, subset):
        for position, recipe in enumerate(recipes):
            if self.crash_after is not None and self.calls >= self.crash_after:
                raise KeyboardInterrupt("simulated kill")
            self.calls += 1
            p = 1 + fitness(recipe)
            values = [float(t < p) for t in THRESHOLDS[subset.positions_in(ITEMS)]]
            self.items += len(values)
            yield position, Outcome(metrics=None, error=None, seconds=0.001, item_values=values, items_total=ITEMS)


def raced_search(path, scorer, *, evaluations=48, optimizer=None):
    g = genome()
    optimizer = optimizer or CMAESOptimizer(space=g.space, n_objectives=1, seed=3, popsize=8)
    should_prune = optimizer.should_prune if getattr(optimizer, "prunes", False) else None
    race = Race(
        score_items=scorer,
        metric="toy/acc",
        first_round=16,
        delta=0.2,
        selected=optimizer.selected_count(),
        seed=0,
        should_prune=should_prune,
    )
    run = RunFolder(path)
    run.lock()
    try:
        return run_search(
            run=run,
            genome=g,
            optimizer=optimizer,
            evaluate=race,
            objectives=OBJECTIVES,
            budget=Budget(evaluations=evaluations),
        )
    finally:
        run.close()


def test_a_run_killed_mid_race_resumes_to_the_identical_log(tmp_path):
    straight = ItemScorer()
    state = raced_search(tmp_path / "straight", straight)
    rows = RunFolder(tmp_path / "straight").read_evaluations()
    assert len(rows) == 48
    assert any(r["items"][0] < ITEMS for r in rows)  # the race stopped some candidates early
    assert straight.items < 48 * ITEMS
    assert state.best is not None and rows[state.best.index]["items"] == [ITEMS, ITEMS]  # the best saw every item
    with pytest.raises(KeyboardInterrupt):
        raced_search(tmp_path / "crashed", ItemScorer(crash_after=straight.calls // 2))
    crashed = RunFolder(tmp_path / "crashed")
    assert 0 < len(crashed.read_evaluations()) < 48
    raced_search(tmp_path / "crashed", ItemScorer())
    assert crashed.read_evaluations() == rows  # every field, the items each candidate saw included


def test_optunas_successive_halving_prunes_between_rounds(tmp_path):
    def tpe():
        return TPEOptimizer(
            space=genome().space, n_objectives=1, seed=0, batch_size=8, n_startup_trials=8, pruner="successive_halving"
        )

    scorer = ItemScorer()
    raced_search(tmp_path / "run", scorer, optimizer=tpe())
    rows = RunFolder(tmp_path / "run").read_evaluations()
    stopped = [r for r in rows if r["items"][0] < ITEMS]
    assert stopped  # pruned: told the estimate from the rounds it saw
    assert scorer.items == sum(r["items"][0] for r in rows)
    # The pruner's memory (every trial's intermediate values) survives a resume: a kill, then the same log.
    with pytest.raises(KeyboardInterrupt):
        raced_search(tmp_path / "crashed", ItemScorer(crash_after=scorer.calls // 2), optimizer=tpe())
    raced_search(tmp_path / "crashed", ItemScorer(), optimizer=tpe())
    assert RunFolder(tmp_path / "crashed").read_evaluations() == rows


def test_optuna_refuses_a_pruner_for_several_objectives():
    with pytest.raises(EvomergeError, match="multi-objective"):
        TPEOptimizer(space=genome().space, n_objectives=2, seed=0, pruner="hyperband")


def toy_racing_config(world, run_dir, *extra):
    from hydra import compose, initialize_config_dir

    from evomerge.config import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                f"run_dir={run_dir}",
                f"models.base={world.base}",
                f"models.experts=[{world.experts['math']},{world.experts['lang']}]",
                f"tasks.include_path={world.tasks_dir}",
                "tasks.names=[toy_math]",
                "objectives=[{name: math, terms: {toy_math/acc: 1.0}}]",
                "method.name=task_arithmetic",
                "budget.evaluations=4",
                "racing.enabled=true",
                "racing.first_round=16",
                *extra,
            ],
        )


def test_a_raced_search_on_the_toy_world_reports_a_best_scored_on_every_item(toy_world, tmp_path):
    """Through the real worker: lm-eval scores racing's rounds item by item, and the best's estimate over
    every item in racing order is the task's accuracy as a full scoring reports it."""
    from evomerge.executor.worker import Worker, WorkerSpec
    from evomerge.recipe.recipe import Recipe
    from evomerge.search.session import start, task_set

    cfg = toy_racing_config(toy_world, tmp_path / "run", "optimizer.popsize=4")
    state = start(cfg, tmp_path / "run")
    rows = RunFolder(tmp_path / "run").read_evaluations()
    total = sum(1 for _ in (toy_world.tasks_dir / "toy_math" / "test.jsonl").open())
    assert all(row["items"][1] == total for row in rows)
    assert rows[state.best.index]["items"] == [total, total]
    best = Recipe.from_plain(state.best.recipe, where="best")
    full = Worker(WorkerSpec(template=best, tasks=task_set(cfg))).evaluate(best)
    assert state.best.metrics["toy_math/acc"] == pytest.approx(full.metrics["toy_math/acc"], abs=1e-12)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["objectives=[{name: a, terms: {toy_math/acc: 1.0}}, {name: b, terms: {toy_lang/acc: 1.0}}]"], "one"),
        (["in_flight=4", "optimizer=tpe"], "in_flight=4"),
        (["racing.enabled=false", "optimizer=tpe", "optimizer.pruner=hyperband"], "racing is off"),
    ],
)
def test_racing_refuses_what_it_cannot_race(toy_world, tmp_path, extra, message):
    from evomerge.search.session import start

    with pytest.raises(EvomergeError, match=message):
        start(toy_racing_config(toy_world, tmp_path / "run", *extra), tmp_path / "run")


def test_lm_eval_scores_items_by_racing_position(toy_world):
    """The adapter over lm-eval's logged samples: a slice of racing order scores the same items as the
    same slice of every item (lm-eval labels selected items by the order it was given them, so this fails
    if the indices reach it unsorted), and every item together gives lm-eval's own accuracy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate.lm_eval_scorer import ItemSubset, LMEvalScorer, TaskSet

    model = AutoModelForCausalLM.from_pretrained(toy_world.experts["math"])
    tasks = TaskSet(names=("toy_math",), include_path=str(toy_world.tasks_dir))
    scorer = LMEvalScorer(model=model, tokenizer=AutoTokenizer.from_pretrained(toy_world.base), tasks=tasks)
    every, total = scorer.score_items(ItemSubset(metric="toy_math/acc", start=0, stop=10**6))
    assert total == len(every) == sum(1 for _ in (toy_world.tasks_dir / "toy_math" / "test.jsonl").open())
    assert set(every) == {0.0, 1.0}
    assert sum(every) / total == pytest.approx(scorer.score()["toy_math/acc"], abs=1e-12)
    window, _ = scorer.score_items(ItemSubset(metric="toy_math/acc", start=5, stop=35))
    assert window == every[5:35]
    # A race's generation order: positions count in racing order permuted by default_rng((seed, generation)).
    shuffled, _ = scorer.score_items(ItemSubset(metric="toy_math/acc", start=5, stop=35, shuffle=(3, 1)))
    assert shuffled == [every[p] for p in np.random.default_rng([3, 1]).permutation(total)[5:35]]
    with pytest.raises(EvomergeError, match="toy_math/acc"):
        scorer.score_items(ItemSubset(metric="toy_math/no_such_metric", start=0, stop=4))


class FailingTableScorer(TableScorer):
    """A table scorer under which ``failing`` fails from item ``start`` on (a worker lost mid-race)."""

    def __init__(self, table, *, failing: int, start: int) -> None:
        super().__init__(table)
        self.failing, self.from_item = failing, start

    def __call__(self, recipes, subset):
        for position, outcome in super().__call__(recipes, subset):
            if recipes[position] == self.failing and subset.start >= self.from_item:
                outcome = Outcome(metrics=None, error="worker lost", seconds=0.0)
            yield position, outcome


def test_when_no_candidate_is_left_running_the_leader_is_scored_on_the_rest():
    """optuna's pruner stops all three after round 1 (20 items): the one with the most items and the highest
    mean there, A (1.0), is scored on the other 20, to be the reference: B is told 0.95 + (0.5 - 1.0), C 0.05.
    If A fails on them, B (0.5) takes its place: A is logged failed, and C is told 0.5 + (0.1 - 0.5) = 0.1."""
    scorer = TableScorer([A, B, C])
    race = Race(
        score_items=scorer,
        metric="toy/acc",
        first_round=20,
        delta=0.1,
        selected=None,
        seed=0,
        should_prune=lambda proposal, items, mean: True,
    )
    outcomes = dict(race([0, 1, 2], proposals=[None] * 3, generation=0))
    assert scorer.scored == [(0, 0, 20), (1, 0, 20), (2, 0, 20), (0, 20, 40)]
    assert [outcomes[i].metrics["toy/acc"] for i in range(3)] == pytest.approx([0.95, 0.45, 0.05])
    scorer = FailingTableScorer([A, B, C], failing=0, start=20)
    race.score_items = scorer
    outcomes = dict(race([0, 1, 2], proposals=[None] * 3, generation=0))
    assert scorer.scored == [(0, 0, 20), (1, 0, 20), (2, 0, 20), (0, 20, 40), (1, 20, 40)]
    assert outcomes[0].metrics is None and outcomes[0].error == "worker lost"
    assert [outcomes[i].metrics["toy/acc"] for i in (1, 2)] == pytest.approx([0.5, 0.1])
