"""The search loop with a known fitness in place of lm-eval: cache, failures, resume after a crash."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evomerge.executor.worker import Outcome
from evomerge.genome.ps import ParameterSpaceGenome
from evomerge.optimizer.cmaes import CMAESOptimizer
from evomerge.optimizer.random_search import RandomSearchOptimizer
from evomerge.recipe.recipe import Recipe
from evomerge.search.loop import Budget, run_search
from evomerge.search.run_folder import RunFolder

TEMPLATE = Recipe.from_plain(
    {"method": "ties", "base": "b", "models": [{"model": "m1"}, {"model": "m2"}], "dtype": "float32"}
)
OBJECTIVES = [{"name": "fit", "terms": {"toy/acc": 1.0}}]
TARGET = {"weight": (0.9, 0.3), "density": (0.5, 0.7)}


def genome() -> ParameterSpaceGenome:
    return ParameterSpaceGenome(template=TEMPLATE, num_layers=4, layer_groups=2)


def fitness(recipe: Recipe) -> float:
    """A smooth function of the recipe's knobs, peaked at TARGET (every layer group)."""
    total = 0.0
    for i, entry in enumerate(recipe.models):
        for name, target in TARGET.items():
            for layer in range(4):
                value = entry.parameters[name].at(f"model.layers.{layer}.x", layer / 3)
                total -= (value - target[i]) ** 2
    return total


class CountingEvaluator:
    def __init__(self, *, crash_after: int | None = None, nan_every: int | None = None) -> None:
        self.calls = 0
        self.crash_after = crash_after
        self.nan_every = nan_every

    def __call__(self, recipes: list[Recipe]):
        for position, recipe in enumerate(recipes):
            if self.crash_after is not None and self.calls >= self.crash_after:
                raise KeyboardInterrupt("simulated kill")
            self.calls += 1
            value = math.nan if self.nan_every and self.calls % self.nan_every == 0 else fitness(recipe)
            yield position, Outcome(metrics={"toy/acc": value}, error=None, seconds=0.001)


def search(path, evaluator, *, optimizer=None, evaluations=48):
    g = genome()
    run = RunFolder(path)
    run.lock()
    try:
        return run_search(
            run=run,
            genome=g,
            optimizer=optimizer or CMAESOptimizer(space=g.space, n_objectives=1, seed=3, popsize=8),
            evaluate=evaluator,
            objectives=OBJECTIVES,
            budget=Budget(evaluations=evaluations),
        )
    finally:
        run.close()


def logged(path):
    return [(r["key"], r["scores"], r["generation"], r["proposal"]) for r in RunFolder(path).read_evaluations()]


def test_cmaes_climbs_the_known_fitness(tmp_path):
    state = search(tmp_path / "run", CountingEvaluator(), evaluations=160)
    first_generation = [h for h in state.history if h["generation"] == 0][0]["best"]
    assert state.best.scores[0] > first_generation
    assert state.best.scores[0] > -0.05  # near the peak (0); the centre of the box scores about -0.8


@pytest.mark.parametrize("crash_after", [3, 8, 13, 30])
def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, crash_after):
    search(tmp_path / "straight", CountingEvaluator())
    with pytest.raises(KeyboardInterrupt):
        search(tmp_path / "crashed", CountingEvaluator(crash_after=crash_after))
    resumed = CountingEvaluator()
    state = search(tmp_path / "crashed", resumed)
    assert logged(tmp_path / "crashed") == logged(tmp_path / "straight")
    straight = search(tmp_path / "straight", CountingEvaluator())  # a finished run resumes to no work
    assert state.best.recipe == straight.best.recipe and state.best.scores == straight.best.scores
    # Candidates scored before the crash but after the last checkpoint are not scored again.
    assert resumed.calls == 48 - crash_after


def test_repeated_candidates_hit_the_cache(tmp_path):
    class Repeating(RandomSearchOptimizer):
        def _ask_generation(self):
            proposals = super()._ask_generation()
            return [proposals[0]] + [type(p)(id=p.id, x=proposals[0].x) for p in proposals[1:]]

    g = genome()
    evaluator = CountingEvaluator()
    search(
        tmp_path / "run",
        evaluator,
        optimizer=Repeating(space=g.space, n_objectives=1, seed=0, batch_size=4),
        evaluations=8,
    )
    rows = RunFolder(tmp_path / "run").read_evaluations()
    assert evaluator.calls == 2  # one distinct candidate per generation
    assert [r["cached"] for r in rows] == [False, False, False, False, True, True, True, True] or sum(
        r["cached"] for r in rows
    ) == 6


def test_nan_scores_are_logged_and_ranked_worst(tmp_path):
    state = search(tmp_path / "run", CountingEvaluator(nan_every=3), evaluations=24)
    rows = RunFolder(tmp_path / "run").read_evaluations()
    failed = [r for r in rows if r["scores"] == [None]]
    assert len(failed) == 8
    assert state.best is not None and math.isfinite(state.best.scores[0])
    assert all(h["mean"] == h["mean"] for h in state.history)  # means over the finite scores only


def test_two_processes_cannot_drive_one_run(tmp_path):
    from evomerge.errors import EvomergeError

    first = RunFolder(tmp_path / "run")
    first.lock()
    with pytest.raises(EvomergeError, match="being driven by pid"):
        RunFolder(tmp_path / "run").lock()
    first.close()
    RunFolder(tmp_path / "run").lock()


def test_genome_round_trip():
    g = genome()
    x = np.random.default_rng(0).random(g.dimension)
    recipe = g.to_recipe(x)
    np.testing.assert_allclose(g.from_recipe(recipe), x, atol=1e-12)
    assert g.dimension == 2 * 2 * 2  # (weight, density) x 2 models x 2 layer groups; lambda is not searched
