"""The contract every optimizer passes (like optuna's `optuna/testing/pytest_samplers.py`).

Optimizers are built from the real conf/optimizer/*.yaml through `hydra.utils.instantiate`, the way the
search loop builds them, with their batch sizes shrunk so the whole file runs in well under a minute.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import hydra.utils
import numpy as np
import optuna
import pytest
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from evomerge.errors import EvomergeError
from evomerge.optimizer import (
    BinaryDim,
    FailurePenalty,
    FloatDim,
    Optimizer,
    ParetoFront,
    Proposal,
    SearchSpace,
)
from evomerge.optimizer.cmaes import CMAESOptimizer

CONF_DIR = Path(__file__).resolve().parents[1] / "evomerge" / "conf" / "optimizer"
SHRINK = {
    "cmaes": {},
    "lq_cmaes": {},
    "nsga2": {"population_size": 10},
    "tpe": {"batch_size": 10, "n_startup_trials": 10},
    "random": {"batch_size": 10},
}
ALL = sorted(SHRINK)
MULTI_OBJECTIVE = ["nsga2", "random", "tpe"]
LEARNING = ["cmaes", "lq_cmaes", "nsga2", "tpe"]  # the ones that read their scores
SINGLE_OBJECTIVE = ["cmaes", "lq_cmaes"]

# Six floats with unequal ranges, so a bug in the unit-box mapping cannot hide.
FLOAT_SPACE = SearchSpace(dims=[FloatDim(name=f"w{i}", low=-1.0 + i, high=1.0 + 2 * i) for i in range(6)])
MIXED_SPACE = SearchSpace(
    dims=[FloatDim(name="weight", low=0.0, high=1.0), FloatDim(name="density", low=0.1, high=0.9)]
    + [BinaryDim(name=f"layer{i}") for i in range(4)]
)


def make(name: str, *, space: SearchSpace, n_objectives: int = 1, seed: int = 0, run_dir=None) -> Optimizer:
    config = OmegaConf.merge(OmegaConf.load(CONF_DIR / f"{name}.yaml"), SHRINK[name])
    return hydra.utils.instantiate(config, space=space, n_objectives=n_objectives, seed=seed, run_dir=run_dir)


def unit(space: SearchSpace, x: np.ndarray) -> np.ndarray:
    return (x - space.low) / (space.high - space.low)


def sphere(space: SearchSpace, proposals: list[Proposal], centre: float = 0.3) -> list[tuple[float, ...]]:
    """-||u - centre||^2 with u the proposal in unit-box coordinates; maximum 0 at u = centre."""
    return [(-float(np.sum((unit(space, p.x) - centre) ** 2)),) for p in proposals]


def two_spheres(space: SearchSpace, proposals: list[Proposal]) -> list[tuple[float, ...]]:
    """Two conflicting objectives: closeness to the 0.2 corner and to the 0.8 corner of the unit box."""
    return [sphere(space, [p], 0.2)[0] + sphere(space, [p], 0.8)[0] for p in proposals]


def scores_with_failures(space: SearchSpace, proposals: list[Proposal], n_objectives: int) -> list[tuple]:
    """Deterministic scores where every fifth candidate fails in a different way."""
    failures = [float("nan"), float("-inf"), None, float("inf")]
    scores = sphere(space, proposals) if n_objectives == 1 else two_spheres(space, proposals)
    return [
        tuple(failures[(p.id // 5) % 4] for _ in s) if p.id % 5 == 0 else s
        for p, s in zip(proposals, scores, strict=True)
    ]


def run(optimizer: Optimizer, generations: int, score) -> list[list[Proposal]]:
    history = []
    for _ in range(generations):
        proposals = optimizer.ask()
        optimizer.tell(proposals, score(proposals))
        history.append(proposals)
    return history


def same_proposals(a: list[list[Proposal]], b: list[list[Proposal]]) -> bool:
    flat_a = [p for generation in a for p in generation]
    flat_b = [p for generation in b for p in generation]
    return len(flat_a) == len(flat_b) and all(
        p.id == q.id and np.array_equal(p.x, q.x) for p, q in zip(flat_a, flat_b, strict=True)
    )


def hypervolume_2d(points: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by `points` (maximized) above `reference`: sweep in decreasing first objective."""
    area, covered_second = 0.0, reference[1]
    for first, second in sorted(points, reverse=True):
        if second > covered_second:
            area += (first - reference[0]) * (second - covered_second)
            covered_second = second
    return area


def front_of(proposals: list[Proposal], scores: list[tuple[float, ...]]) -> ParetoFront:
    front = ParetoFront(n_objectives=len(scores[0]))
    for proposal, score in zip(proposals, scores, strict=True):
        front.add(id=proposal.id, scores=score)
    return front


@pytest.mark.parametrize("name", ALL)
def test_improves_a_sphere_through_ask_tell(name):
    optimizer = make(name, space=FLOAT_SPACE, seed=1)
    best_per_generation, best_x = [], None
    for _ in range(30):
        proposals = optimizer.ask()
        scores = [s[0] for s in sphere(FLOAT_SPACE, proposals)]
        best_per_generation.append(max(scores))
        if max(scores) >= max(best_per_generation):
            best_x = proposals[int(np.argmax(scores))].x
        optimizer.tell(proposals, [(s,) for s in scores])
    first, best = best_per_generation[0], max(best_per_generation)
    if name == "random":
        assert best > first  # the baseline only has to keep drawing
    else:
        assert best > first / 5, (first, best)  # squared distance to the optimum shrank five-fold
    if name in SINGLE_OBJECTIVE:
        assert np.abs(unit(FLOAT_SPACE, best_x) - 0.3).max() < 0.05


@pytest.mark.parametrize("name", MULTI_OBJECTIVE)
def test_two_objectives_push_the_pareto_front_out(name):
    optimizer = make(name, space=FLOAT_SPACE, n_objectives=2, seed=2)
    reference = (-6.0, -6.0)  # no point of the unit box scores below -6 (= 6 dims * 1^2)
    history = run(optimizer, 15, lambda proposals: two_spheres(FLOAT_SPACE, proposals))
    first = history[0]
    first_front = front_of(first, two_spheres(FLOAT_SPACE, first))
    everything = [p for generation in history for p in generation]
    final_front = front_of(everything, two_spheres(FLOAT_SPACE, everything))
    volume_first = hypervolume_2d([m.scores for m in first_front.members], reference)
    volume_final = hypervolume_2d([m.scores for m in final_front.members], reference)
    assert volume_final > volume_first


RESUME_CASES = [(name, 1) for name in ALL] + [("nsga2", 2), ("tpe", 2)]


@pytest.mark.parametrize(("name", "n_objectives"), RESUME_CASES)
def test_resumes_exactly_after_a_checkpoint_and_a_crash(name, n_objectives):
    def score(proposals):
        return scores_with_failures(MIXED_SPACE, proposals, n_objectives)

    uninterrupted = run(make(name, space=MIXED_SPACE, n_objectives=n_objectives), 10, score)

    first = make(name, space=MIXED_SPACE, n_objectives=n_objectives)
    before = run(first, 5, score)
    checkpoint = pickle.dumps(first.state_dict())
    crashed_generation = first.ask()  # asked, never told: the process dies here
    state_mid_generation = pickle.dumps(first.state_dict())
    del first

    for saved in (checkpoint, state_mid_generation):
        resumed = make(name, space=MIXED_SPACE, n_objectives=n_objectives, seed=12345)  # the seed is overridden
        resumed.load_state_dict(pickle.loads(saved))
        after = run(resumed, 5, score)
        assert same_proposals(before + after, uninterrupted)
        assert same_proposals([crashed_generation], [after[0]])


def test_nsga2_generations_stay_aligned_with_ours_across_a_resume():
    optimizer = make("nsga2", space=MIXED_SPACE, n_objectives=2)
    run(optimizer, 3, lambda ps: scores_with_failures(MIXED_SPACE, ps, 2))
    resumed = make("nsga2", space=MIXED_SPACE, n_objectives=2)
    resumed.load_state_dict(pickle.loads(pickle.dumps(optimizer.state_dict())))
    run(resumed, 3, lambda ps: scores_with_failures(MIXED_SPACE, ps, 2))
    trials = resumed.state_dict()["algorithm"]["trials"]
    assert [t["system_attrs"]["NSGAIISampler:generation"] for t in trials] == [t["number"] // 10 for t in trials]


@pytest.mark.parametrize("name", ALL)
def test_proposals_respect_the_space_and_failures_do_not_crash(name):
    optimizer = make(name, space=MIXED_SPACE, seed=3)
    binary = MIXED_SPACE.is_binary
    for generation in range(6):
        proposals = optimizer.ask()
        x = np.array([p.x for p in proposals])
        assert np.isin(x[:, binary], (0.0, 1.0)).all()
        assert (x[:, ~binary] >= MIXED_SPACE.low[~binary]).all()
        assert (x[:, ~binary] <= MIXED_SPACE.high[~binary]).all()
        if generation == 2:
            scores = [(float("nan"),)] * len(proposals)  # a whole generation fails
        else:
            scores = scores_with_failures(MIXED_SPACE, proposals, 1)
        optimizer.tell(proposals, scores)
    assert len({p.id for p in proposals}) == len(proposals)


def fails_right_of_centre(space: SearchSpace, proposals: list[Proposal]) -> list[tuple[float, ...]]:
    """The sphere around 0.3, except that every candidate with u[0] > 0.6 fails."""
    scores = sphere(space, proposals)
    return [(-np.inf,) if unit(space, p.x)[0] > 0.6 else s for p, s in zip(proposals, scores, strict=True)]


@pytest.mark.parametrize("name", LEARNING)
def test_failures_rank_worst_so_search_leaves_them(name):
    optimizer = make(name, space=FLOAT_SPACE, seed=4)
    history = run(optimizer, 15, lambda proposals: fails_right_of_centre(FLOAT_SPACE, proposals))

    def failure_rate(generations):
        proposals = [p for generation in generations for p in generation]
        return np.mean([unit(FLOAT_SPACE, p.x)[0] > 0.6 for p in proposals])

    assert failure_rate(history[-5:]) < 0.5 * failure_rate(history[:1]) + 1e-9


def test_failure_penalty_worked_by_hand():
    penalty = FailurePenalty(n_objectives=2)
    # Nothing finite seen on objective 0 yet: -1. Objective 1 has seen only 1.0: 1 - max(1, 0) = 0.
    first = penalty.apply(np.array([[np.nan, 1.0], [-np.inf, np.nan]]))
    np.testing.assert_array_equal(first, [[-1.0, 1.0], [-1.0, 0.0]])
    # Objective 0 spans [0.5, 0.7] -> 0.5 - 1 = -0.5; objective 1 spans [1, 3] -> 1 - 2 = -1.
    second = penalty.apply(np.array([[0.5, 3.0], [0.7, np.nan], [np.inf, 2.0]]))
    np.testing.assert_array_equal(second, [[0.5, 3.0], [0.7, -1.0], [-0.5, 2.0]])


@pytest.mark.parametrize("name", ALL)
def test_tell_order_does_not_change_the_run(name):
    def tell_reversed(optimizer):
        proposals = optimizer.ask()
        optimizer.tell(proposals[::-1], sphere(MIXED_SPACE, proposals[::-1]))
        return proposals

    in_order = run(make(name, space=MIXED_SPACE), 3, lambda ps: sphere(MIXED_SPACE, ps))
    optimizer = make(name, space=MIXED_SPACE)
    reversed_order = [tell_reversed(optimizer) for _ in range(3)]
    assert same_proposals(in_order, reversed_order)


@pytest.mark.parametrize("name", ALL)
def test_no_global_random_state_is_used(name):
    np.random.seed(7)
    random.seed(7)
    numpy_state, python_state = np.random.get_state()[1].copy(), random.getstate()
    run(make(name, space=MIXED_SPACE), 3, lambda ps: sphere(MIXED_SPACE, ps))
    assert np.array_equal(np.random.get_state()[1], numpy_state)
    assert random.getstate() == python_state


def test_ask_tell_misuse_is_refused():
    optimizer = make("random", space=MIXED_SPACE)
    with pytest.raises(RuntimeError):
        optimizer.tell([], [])
    proposals = optimizer.ask()
    with pytest.raises(RuntimeError):
        optimizer.ask()
    with pytest.raises(ValueError):
        optimizer.tell(proposals[1:], sphere(MIXED_SPACE, proposals[1:]))
    with pytest.raises(ValueError):
        optimizer.tell(proposals, [(0.0, 0.0)] * len(proposals))
    with pytest.raises(ValueError):  # read-only: what was asked is what gets told
        proposals[0].x[0] = 0.5


def test_cmaes_refuses_several_objectives():
    with pytest.raises(EvomergeError, match="nsga2"):
        CMAESOptimizer(space=FLOAT_SPACE, n_objectives=2, seed=0)
    # Hydra wraps whatever a constructor raises; the EvomergeError for the CLI is the cause.
    with pytest.raises(InstantiationException) as caught:
        make("cmaes", space=FLOAT_SPACE, n_objectives=2)
    assert isinstance(caught.value.__cause__, EvomergeError)


@pytest.mark.parametrize("sigma0", [0.25, 0.5, 1.0])
def test_cmaes_searches_a_one_dimensional_genome(sigma0):
    """One knob (slerp's t, or sce's select_topk with one layer group): pycma alone raises in 1-D
    from sigma0 = 0.5 in the unit box. The optimizer finds the optimum and resumes exactly."""
    space = SearchSpace(dims=[FloatDim(name="t", low=0.0, high=2.0)])
    uninterrupted = run(
        CMAESOptimizer(space=space, n_objectives=1, seed=3, sigma0=sigma0), 30, lambda ps: sphere(space, ps)
    )
    assert all(proposal.x.shape == (1,) and 0.0 <= proposal.x[0] <= 2.0 for g in uninterrupted for proposal in g)
    assert abs(uninterrupted[-1][0].x[0] - 0.6) < 0.05  # the sphere's centre, 0.3 of the way along [0, 2]

    first = CMAESOptimizer(space=space, n_objectives=1, seed=3, sigma0=sigma0)
    before = run(first, 15, lambda ps: sphere(space, ps))
    resumed = CMAESOptimizer(space=space, n_objectives=1, seed=99, sigma0=sigma0)
    resumed.load_state_dict(pickle.loads(pickle.dumps(first.state_dict())))
    assert same_proposals(before + run(resumed, 15, lambda ps: sphere(space, ps)), uninterrupted)


def test_a_checkpoint_from_another_config_is_refused():
    optimizer = make("cmaes", space=MIXED_SPACE)
    run(optimizer, 1, lambda ps: sphere(MIXED_SPACE, ps))
    with pytest.raises(EvomergeError, match="original config"):
        make("cmaes", space=FLOAT_SPACE).load_state_dict(optimizer.state_dict())
    with pytest.raises(EvomergeError, match="original config"):
        make("random", space=MIXED_SPACE).load_state_dict(optimizer.state_dict())


@pytest.mark.parametrize("config_path", sorted(CONF_DIR.glob("*.yaml")), ids=lambda path: path.stem)
def test_every_optimizer_config_instantiates(config_path, tmp_path):
    config = OmegaConf.load(config_path)
    n_objectives = 1 if config_path.stem in SINGLE_OBJECTIVE else 2
    optimizer = hydra.utils.instantiate(config, space=MIXED_SPACE, n_objectives=n_objectives, seed=0, run_dir=tmp_path)
    assert isinstance(optimizer, Optimizer)
    assert optimizer.space == MIXED_SPACE  # a real SearchSpace, not a DictConfig made of it
    assert len(optimizer.ask()) >= 2  # telling (and the optuna.db it writes) is covered above


def test_optuna_db_mirrors_the_study_and_survives_a_resume(tmp_path):
    def score(proposals, shift=0.0):
        scores = scores_with_failures(MIXED_SPACE, proposals, 2)
        return [(None if s[0] is None else s[0] + shift, s[1]) for s in scores]

    def stored_trials():
        study = optuna.load_study(study_name="evomerge", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
        return study.get_trials()

    optimizer = make("nsga2", space=MIXED_SPACE, n_objectives=2, run_dir=tmp_path)
    run(optimizer, 2, score)
    checkpoint = pickle.dumps(optimizer.state_dict())
    run(optimizer, 1, score)  # optuna.db is now a generation ahead of the checkpoint
    optimizer.close()  # the file is written on a thread: wait for it
    assert [t.number for t in stored_trials()] == list(range(30))

    resumed = make("nsga2", space=MIXED_SPACE, n_objectives=2, run_dir=tmp_path)
    resumed.load_state_dict(pickle.loads(checkpoint))
    proposals = resumed.ask()
    resumed.tell(proposals, score(proposals, shift=1.0))  # the rerun scores differently
    resumed.close()
    trials = stored_trials()
    expected = resumed.state_dict()["algorithm"]["trials"]
    assert [t.values for t in trials] == [e["values"] for e in expected]
    assert trials[21].values[0] == pytest.approx(score([proposals[1]], shift=1.0)[0][0])
    assert trials[0].user_attrs == {"failed": True}
    assert trials[-1].system_attrs["NSGAIISampler:generation"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optuna.db"]


def test_pareto_front_worked_by_hand():
    front = ParetoFront(n_objectives=2)
    assert front.add(id=0, scores=(0.4, 0.4))
    assert front.add(id=1, scores=(1.0, 0.0))
    assert front.add(id=2, scores=(0.5, 0.5))  # dominates 0
    assert not front.add(id=3, scores=(0.5, 0.2))  # dominated by 2
    assert front.add(id=4, scores=(1.0, 0.0))  # a tie stays
    assert not front.add(id=5, scores=(float("nan"), 0.3))  # NaN counts as -inf: dominated by 2
    assert front.ids == (1, 2, 4)
    assert front.members[1].scores == (0.5, 0.5)
    # Union of the rectangles [0, 1] x [0, 0] and [0, 0.5] x [0, 0.5].
    assert hypervolume_2d([m.scores for m in front.members], (0.0, 0.0)) == pytest.approx(0.25)
    # Staircase 3*1 + 2*(2-1) + 1*(3-2).
    assert hypervolume_2d([(1.0, 3.0), (3.0, 1.0), (2.0, 2.0)], (0.0, 0.0)) == pytest.approx(6.0)

    restored = ParetoFront(n_objectives=2)
    restored.load_state_dict(pickle.loads(pickle.dumps(front.state_dict())))
    assert restored.members == front.members
    with pytest.raises(ValueError):
        restored.add(id=2, scores=(9.0, 9.0))


ONE_AT_A_TIME = ["nsga2", "random", "tpe"]


def run_window(optimizer: Optimizer, count: int, score, *, stop_after: int | None = None) -> list[Proposal]:
    """The asynchronous loop's order for `count` candidates: 4 in flight, the oldest told before each new
    ask; returns the proposals asked. `stop_after`: stop (as if killed) once that many are told."""
    asked = list(optimizer.in_flight())
    told = asked[0].id if asked else 0
    while told < (count if stop_after is None else stop_after):
        while len(optimizer.in_flight()) < 4 and told + len(optimizer.in_flight()) < count:
            asked.append(optimizer.ask_one())
        oldest = optimizer.in_flight()[0]
        optimizer.tell_one(oldest, score([oldest])[0])
        told += 1
    return asked


@pytest.mark.parametrize(("name", "n_objectives"), [(name, 1) for name in ONE_AT_A_TIME] + [("tpe", 2)])
def test_one_at_a_time_resumes_exactly_with_candidates_in_flight(name, n_objectives):
    def score(proposals):
        return scores_with_failures(MIXED_SPACE, proposals, n_objectives)

    uninterrupted = run_window(make(name, space=MIXED_SPACE, n_objectives=n_objectives), 30, score)
    first = make(name, space=MIXED_SPACE, n_objectives=n_objectives)
    before = run_window(first, 30, score, stop_after=13)
    saved = pickle.dumps(first.state_dict())
    assert [p.id for p in first.in_flight()] == [13, 14, 15]  # asked, not told, when the process dies
    resumed = make(name, space=MIXED_SPACE, n_objectives=n_objectives, seed=12345)  # the seed is overridden
    resumed.load_state_dict(pickle.loads(saved))
    after = run_window(resumed, 30, score)
    assert same_proposals([before], [uninterrupted[:16]]) and same_proposals([after], [uninterrupted[13:]])
    if name in LEARNING:  # past the startup trials, what was told shapes what is asked
        flat = run_window(
            make(name, space=MIXED_SPACE, n_objectives=n_objectives), 30, lambda ps: [(0.0,) * n_objectives] * len(ps)
        )
        assert not same_proposals([flat], [uninterrupted])


def test_cmaes_asks_whole_generations_only():
    optimizer = make("cmaes", space=FLOAT_SPACE)
    assert not optimizer.asks_one_at_a_time
    with pytest.raises(RuntimeError, match="asks whole generations only"):
        optimizer.ask_one()


def test_one_at_a_time_and_generations_do_not_mix():
    optimizer = make("tpe", space=FLOAT_SPACE)
    proposal = optimizer.ask_one()
    with pytest.raises(RuntimeError, match="in flight"):
        optimizer.ask()
    optimizer.tell_one(proposal, (float("nan"),))  # a failure: told with the penalty, -1 with nothing seen
    assert optimizer.state_dict()["algorithm"]["trials"][0]["values"] == [-1.0]
    with pytest.raises(ValueError, match="not told yet"):
        optimizer.tell_one(proposal, (0.0,))
