"""The IRT anchor estimator recovers known accuracies from responses drawn from a known model.

The bounds come from simulating these worlds over seeds 0-7 (60 anchors out of 600 items, 20
candidates a seed; mean absolute error of the estimate against the realised full accuracy):
- a 2PL fitted on 20 models: per-seed MAE 0.026-0.049, bound 0.055; random 60-item subsets 0.032-0.057;
- 4 endpoints whose merges have a combination of their abilities (MERGE³'s assumption): per-seed MAE
  0.031-0.075, bound 0.08; random 60-item subsets 0.038-0.065.
So these bounds say the estimator works, not that it beats random sampling: fitted on 3-5 models, it
does not (each item's parameters rest on 3-5 observations); `results/irt_toy.md` measures the toy world.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from evomerge.errors import EvomergeError
from evomerge.evaluate.irt import AnchorEstimator

N_ITEMS, N_ANCHORS, DIMS = 600, 60, 2


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def simulated_world(seed: int, *, n_fitted: int, endpoint_mixtures: bool, n_candidates: int = 20):
    """Fitted models' and candidates' 0/1 responses from a 2PL with known item parameters."""
    rng = np.random.default_rng(seed)
    alpha = np.abs(rng.normal(1.0, 0.5, (N_ITEMS, DIMS)))
    beta = rng.normal(0.0, 1.5, N_ITEMS)
    fitted = rng.normal(0.0, 1.0, (n_fitted, DIMS))
    if endpoint_mixtures:  # task-arithmetic-like weights: a convex mix, scaled up to 1.3 to extrapolate a little
        mix = rng.dirichlet(np.ones(n_fitted), n_candidates) * rng.uniform(0.9, 1.3, (n_candidates, 1))
        candidates = mix @ fitted
    else:
        candidates = rng.normal(0.0, 1.0, (n_candidates, DIMS))

    def draw(abilities):
        return (rng.random((len(abilities), N_ITEMS)) < _sigmoid(abilities @ alpha.T - beta)).astype(float)

    return draw(fitted), draw(candidates)


def mean_abs_error(seed: int, *, n_fitted: int, endpoint_mixtures: bool) -> float:
    fitted, candidates = simulated_world(seed, n_fitted=n_fitted, endpoint_mixtures=endpoint_mixtures)
    estimator = AnchorEstimator.fit(fitted, n_anchors=N_ANCHORS, dims=DIMS, seed=seed)
    estimates = np.array([estimator.estimate(row[estimator.anchors]) for row in candidates])
    return float(np.abs(estimates - candidates.mean(axis=1)).mean())


def test_recovers_accuracies_of_a_known_2pl():
    assert mean_abs_error(0, n_fitted=20, endpoint_mixtures=False) <= 0.055


def test_recovers_accuracies_of_merges_of_a_few_endpoints():
    assert mean_abs_error(0, n_fitted=4, endpoint_mixtures=True) <= 0.08


def test_anchors_and_weights_are_deterministic_and_cover_the_items():
    fitted, _ = simulated_world(1, n_fitted=4, endpoint_mixtures=True)
    first = AnchorEstimator.fit(fitted, n_anchors=N_ANCHORS, seed=3)
    second = AnchorEstimator.fit(fitted, n_anchors=N_ANCHORS, seed=3)
    np.testing.assert_array_equal(first.anchors, second.anchors)
    np.testing.assert_array_equal(first.alpha, second.alpha)
    assert len(set(first.anchors.tolist())) == len(first.anchors) <= N_ANCHORS
    assert first.weights.sum() == pytest.approx(1.0)  # each item counted in exactly one anchor's cluster


def test_all_items_as_anchors_gives_the_exact_accuracy():
    fitted, candidates = simulated_world(2, n_fitted=4, endpoint_mixtures=True)
    estimator = AnchorEstimator.fit(fitted[:, :50], n_anchors=50, seed=0)
    row = candidates[0, :50]
    assert len(estimator.anchors) == 50  # one item per cluster, each weighing 1/50
    assert estimator.estimate(row[estimator.anchors]) == pytest.approx(row.mean())


def test_save_and_load_round_trip(tmp_path):
    fitted, candidates = simulated_world(4, n_fitted=4, endpoint_mixtures=True)
    estimator = AnchorEstimator.fit(fitted, n_anchors=N_ANCHORS, seed=0)
    path = tmp_path / "irt.json"
    estimator.save(path)
    assert set(json.loads(path.read_text())) >= {"alpha", "beta", "anchors", "weights"}
    reloaded = AnchorEstimator.load(path)
    np.testing.assert_array_equal(reloaded.anchors, estimator.anchors)
    row = candidates[0, estimator.anchors]
    assert reloaded.estimate(row) == estimator.estimate(row)


@pytest.mark.parametrize(
    ("responses", "n_anchors", "named"),
    [
        (np.zeros((0, 0)), 1, "empty"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), 1, "NaN"),
        (np.array([[1.0, 0.0], [0.0, 1.0]]), 3, "n_anchors=3 but the response matrix has 2 items"),
        (np.array([[1.0, 2.0], [0.0, 1.0]]), 1, "outside [0, 1]"),
        (np.array([1.0, 0.0]), 1, "shape"),
    ],
)
def test_bad_input_is_named(responses, n_anchors, named):
    with pytest.raises(EvomergeError, match=named.replace("[", r"\[").replace("]", r"\]")):
        AnchorEstimator.fit(responses, n_anchors=n_anchors)


def test_wrong_number_of_anchor_responses_is_named():
    fitted, _ = simulated_world(5, n_fitted=4, endpoint_mixtures=True)
    estimator = AnchorEstimator.fit(fitted, n_anchors=10, seed=0)
    with pytest.raises(EvomergeError, match="anchor responses for"):
        estimator.estimate(np.ones(3))
