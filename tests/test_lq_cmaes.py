"""lq-CMA-ES through ask/tell: the same rounds as pycma's own SurrogatePopulation, fewer candidates scored
than plain CMA-ES, and exact resume with a round half scored. The optimizer contract suite
(tests/test_optimizers.py) runs it too."""

from __future__ import annotations

import pickle

import cma
import numpy as np
import pytest
from cma.fitness_models import LQModel, SurrogatePopulation

from evomerge.genome.dfs import DataFlowGenome
from evomerge.optimizer.cmaes import CMAESOptimizer, _GeneratorNormal
from evomerge.optimizer.lq_cmaes import LQCMAESOptimizer, SurrogateRound
from evomerge.optimizer.space import FloatDim, SearchSpace
from tests.test_dfs_start import DFS_GENOME
from tests.test_optimizers import same_proposals
from tests.test_search_loop import CountingEvaluator, genome, logged, search

SPACE = SearchSpace(dims=[FloatDim(name=f"u{i}", low=0.0, high=1.0) for i in range(6)])


def sphere(x: np.ndarray) -> float:
    return -float(np.sum((x - 0.3) ** 2))


def test_rounds_match_pycmas_surrogate_population():
    """The adapter over pycma's internals: if a pycma release changes how SurrogatePopulation picks the
    samples to score, updates its model or builds the values it returns, this fails."""
    es = cma.CMAEvolutionStrategy(
        5 * [1.0], 1.0, {"randn": _GeneratorNormal(np.random.default_rng(0)), "seed": np.nan, "verbose": -9}
    )
    asked_by_pycma: list[int] = []
    population: list[np.ndarray] = []

    def fitness(x):
        asked_by_pycma.append(next(i for i, y in enumerate(population) if y is x))
        return cma.ff.elli(x)

    surrogate = SurrogatePopulation(fitness)
    ours = LQModel()
    partly_modelled = 0
    for _ in range(25):
        population[:] = es.ask()
        asked_by_pycma.clear()
        told = surrogate(population)

        round_ = SurrogateRound(ours, np.array(population))
        asked_by_us = []
        while True:
            batch = round_.batch()
            asked_by_us += batch
            if round_.tell(batch, [cma.ff.elli(population[i]) for i in batch]):
                break
        assert asked_by_us == asked_by_pycma
        assert round_.surrogate_values() == list(told)
        assert np.array_equal(ours.xopt, surrogate.model.xopt)
        partly_modelled += len(asked_by_us) < len(population)
        es.tell(population, told)
        es.inject([surrogate.model.xopt])
    assert partly_modelled > 10  # the surrogate did stand in for true values


def scored_to_reach(optimizer, target: float) -> int:
    scored = 0
    while True:
        proposals = optimizer.ask()
        values = [sphere(p.x) for p in proposals]
        scored += len(proposals)
        if max(values) >= target:
            return scored
        optimizer.tell(proposals, [(v,) for v in values])


def test_lq_scores_fewer_candidates_than_cmaes_to_reach_a_sphere_target():
    plain = [scored_to_reach(CMAESOptimizer(space=SPACE, n_objectives=1, seed=s), -1e-4) for s in (1, 2)]
    lq = [scored_to_reach(LQCMAESOptimizer(space=SPACE, n_objectives=1, seed=s), -1e-4) for s in (1, 2)]
    assert max(lq) * 3 < min(plain), (lq, plain)


def test_a_checkpoint_with_a_round_half_scored_resumes_exactly():
    def run(optimizer, asks):
        history = []
        for _ in range(asks):
            proposals = optimizer.ask()
            optimizer.tell(proposals, [(sphere(p.x),) for p in proposals])
            history.append(proposals)
        return history

    uninterrupted = run(LQCMAESOptimizer(space=SPACE, n_objectives=1, seed=4), 12)
    first = LQCMAESOptimizer(space=SPACE, n_objectives=1, seed=4)
    before = run(first, 1)
    while first._round is None:  # until the surrogate wants more of a CMA-ES generation scored
        before += run(first, 1)
    assert len(before) < 12 and len(before[-1]) < first._es.popsize
    saved = pickle.dumps(first.state_dict())
    resumed = LQCMAESOptimizer(space=SPACE, n_objectives=1, seed=99)
    resumed.load_state_dict(pickle.loads(saved))
    assert same_proposals(before + run(resumed, 12 - len(before)), uninterrupted)


@pytest.mark.parametrize("cls", [CMAESOptimizer, LQCMAESOptimizer])
def test_a_dfs_start_is_the_first_candidate_scored(cls):
    space = DataFlowGenome(**DFS_GENOME, start="embedding_source").space
    assert np.array_equal(cls(space=space, n_objectives=1, seed=0).ask()[0].x, space.from_unit(space.start))


@pytest.mark.parametrize("crash_after", [2, 7, 19])
def test_the_search_loop_resumes_an_lq_run_exactly(tmp_path, crash_after):
    """Through run_search (a known fitness, no models): each ask is one of the loop's generations."""

    def lq():
        return LQCMAESOptimizer(space=genome().space, n_objectives=1, seed=3, popsize=8)

    straight = search(tmp_path / "straight", CountingEvaluator(), optimizer=lq(), evaluations=40)
    assert straight.generation > 40 / 8  # rounds of fewer than popsize candidates
    with pytest.raises(KeyboardInterrupt):
        search(tmp_path / "crashed", CountingEvaluator(crash_after=crash_after), optimizer=lq(), evaluations=40)
    search(tmp_path / "crashed", CountingEvaluator(), optimizer=lq(), evaluations=40)
    assert logged(tmp_path / "crashed") == logged(tmp_path / "straight")
