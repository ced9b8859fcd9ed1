"""A candidate's full-benchmark accuracy estimated from a few anchor items, through item-response theory.

The model is the multidimensional 2PL of tinyBenchmarks (Polo et al., arXiv 2402.14992): model ``m``
answers item ``i`` correctly with probability ``sigmoid(theta_m . alpha_i - beta_i)``. It is fitted
on the full per-item results of the base and the experts (and of the candidates a search has scored on
every item since: ``estimate.refit``, search/estimate.py), anchors are picked by clustering the
items' fitted parameters, and a candidate's accuracy is the gp-IRT blend of its weighted anchor
accuracy with the p-IRT prediction on the items it did not answer.

Why multidimensional: merging experts trades one skill against another (MERGE³, arXiv 2502.10436),
which one ability axis cannot express. Why strong priors: 3-5 fitted models give each item only 3-5
observations for its ``dims + 1`` parameters, so the fit is a MAP estimate under Gaussian priors
(``theta ~ N(0, I)``, ``alpha ~ N(0, I)``, ``beta ~ N(0, 3^2)``) rather than a maximum likelihood,
which would send every item all models got right to ``beta = -inf``. A candidate's ability gets the
prior MERGE³ argues for: a merge of the endpoints has an ability near the endpoints', so its prior
is the Gaussian of the fitted models' abilities (their mean and covariance, widened by ``I`` so a
merge that beats every endpoint is still reachable).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.io.atomic import atomic_write_text

_ALPHA_PRIOR_SD = 1.0
_BETA_PRIOR_SD = 3.0
_FIT_STEPS = 3000
_REFIT_STEPS = 1000
_FIT_LEARNING_RATE = 0.05
_KMEANS_ROUNDS = 50
_NEWTON_STEPS = 30
_BIAS_FOLDS = 5


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free form of 1 / (1 + exp(-z))


def _checked_responses(responses, *, what: str) -> np.ndarray:
    array = np.asarray(responses, dtype=float)
    if array.size == 0:
        raise EvomergeError(f"the {what} is empty", "pass each model's per-item results (0/1 or in [0, 1])")
    if not np.all(np.isfinite(array)):
        raise EvomergeError(
            f"the {what} holds NaN or infinite values",
            "score every item (an item that failed to score counts as 0) before fitting or estimating",
        )
    if array.min() < 0.0 or array.max() > 1.0:
        raise EvomergeError(f"the {what} has values outside [0, 1]", "pass per-item accuracies, 0/1 or in [0, 1]")
    return array


class AnchorEstimator:
    """Fitted item parameters, the chosen anchors and their weights; estimates accuracy from anchor results."""

    def __init__(
        self,
        *,
        alpha: np.ndarray,
        beta: np.ndarray,
        abilities: np.ndarray,
        anchors: np.ndarray,
        weights: np.ndarray,
        irt_bias_squared: float,
    ) -> None:
        self.alpha = np.asarray(alpha, dtype=float)  # items x dims
        self.beta = np.asarray(beta, dtype=float)  # items
        self.abilities = np.asarray(abilities, dtype=float)  # fitted models x dims
        self.anchors = np.asarray(anchors, dtype=int)  # item indices, each the item nearest its cluster's centre
        self.weights = np.asarray(weights, dtype=float)  # each anchor's cluster share of the items; sums to 1
        self.irt_bias_squared = float(irt_bias_squared)

    @classmethod
    def fit(
        cls, responses, *, n_anchors: int, dims: int = 2, seed: int = 0, start: AnchorEstimator | None = None
    ) -> AnchorEstimator:
        """Fit on a models x items matrix of full results (base and experts), then choose ``n_anchors`` items.

        ``start``: an estimator fitted on the first rows of ``responses`` (the endpoints), to start from. A
        refit adds a few models to thousands of items whose parameters barely move, so it starts from
        there and takes ``_REFIT_STEPS`` steps instead of ``_FIT_STEPS`` (60 models x 14,000 items: see
        scripts/refit_cost.py). It starts from the endpoints' fit, not the last refit, so each fit is a
        function of its rows alone and a resumed run fits the same model without the chain before it."""
        y = _checked_responses(responses, what="response matrix")
        if y.ndim != 2:
            raise EvomergeError(
                f"the response matrix has shape {y.shape}", "pass a 2-D array, one row per model, one column per item"
            )
        n_items = y.shape[1]
        if not 1 <= n_anchors <= n_items:
            raise EvomergeError(
                f"n_anchors={n_anchors} but the response matrix has {n_items} items",
                f"choose between 1 and {n_items} anchors",
            )
        if dims < 1:
            raise EvomergeError(f"dims={dims}", "the ability needs at least one dimension")
        rng = np.random.default_rng(seed)
        initial = None if start is None else _starting_point(start, len(y))
        abilities, alpha, beta = _fit_map(y, dims=dims, rng=rng, initial=initial)
        anchors, weights = _cluster_anchors(np.column_stack([alpha, beta]), n_anchors=n_anchors, rng=rng)
        estimator = cls(
            alpha=alpha, beta=beta, abilities=abilities, anchors=anchors, weights=weights, irt_bias_squared=0.0
        )
        estimator.irt_bias_squared = _held_out_bias_squared(
            y, dims=dims, n_anchors=n_anchors, seed=seed, initial=initial
        )
        return estimator

    def ability(self, anchor_responses: np.ndarray) -> np.ndarray:
        """MAP ability from anchor results, under the prior spanned by the fitted models' abilities."""
        y = self._checked_anchor_responses(anchor_responses)
        mean = self.abilities.mean(axis=0)
        spread = np.atleast_2d(np.cov(self.abilities, rowvar=False)) if len(self.abilities) > 1 else 0.0
        precision = np.linalg.inv(spread + np.eye(self.alpha.shape[1]))
        alpha, beta = self.alpha[self.anchors], self.beta[self.anchors]
        theta = mean.copy()
        for _ in range(_NEWTON_STEPS):  # the log-posterior is concave: Newton converges in a few steps
            p = _sigmoid(alpha @ theta - beta)
            gradient = alpha.T @ (y - p) - precision @ (theta - mean)
            hessian = (alpha * (p * (1 - p))[:, None]).T @ alpha + precision
            theta = theta + np.linalg.solve(hessian, gradient)
        return theta

    def p_irt(self, anchor_responses: np.ndarray) -> float:
        """Observed results on the anchors, the fitted model's probabilities on every other item."""
        y = self._checked_anchor_responses(anchor_responses)
        predicted = _sigmoid(self.alpha @ self.ability(y) - self.beta)
        predicted[self.anchors] = y
        return float(predicted.mean())

    def estimate(self, anchor_responses) -> float:
        """gp-IRT: the weighted anchor accuracy and p-IRT blended by their expected squared errors."""
        y = self._checked_anchor_responses(anchor_responses)
        p_irt = self.p_irt(y)
        p = _sigmoid(self.alpha[self.anchors] @ self.ability(y) - self.beta[self.anchors])
        anchor_variance = float(np.sum(self.weights**2 * p * (1 - p)))
        blend = self.irt_bias_squared / (self.irt_bias_squared + anchor_variance)
        return blend * float(self.weights @ y) + (1 - blend) * p_irt

    def _checked_anchor_responses(self, anchor_responses) -> np.ndarray:
        y = _checked_responses(anchor_responses, what="anchor responses")
        if y.shape != self.anchors.shape:
            raise EvomergeError(
                f"got {y.size} anchor responses for {self.anchors.size} anchors",
                "pass the candidate's result on each item of `anchors`, in that order",
            )
        return y

    def state(self) -> dict:
        """Everything the estimator holds, as plain JSON-ready values (``from_state`` reads it back)."""
        return {
            "alpha": self.alpha.tolist(),
            "beta": self.beta.tolist(),
            "abilities": self.abilities.tolist(),
            "anchors": self.anchors.tolist(),
            "weights": self.weights.tolist(),
            "irt_bias_squared": self.irt_bias_squared,
        }

    @classmethod
    def from_state(cls, state: dict) -> AnchorEstimator:
        return cls(**{key: np.asarray(value) if isinstance(value, list) else value for key, value in state.items()})

    def save(self, path: str | Path) -> None:
        """Write as JSON, to a temporary name then renamed, so a killed run never leaves half a file."""
        atomic_write_text(Path(path), json.dumps(self.state()))

    @classmethod
    def load(cls, path: str | Path) -> AnchorEstimator:
        return cls.from_state(json.loads(Path(path).read_text()))


def _starting_point(start: AnchorEstimator, n_models: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Abilities and item parameters to start a refit from: ``start``'s, and for each model it has not seen
    the mean of its abilities (a merge's ability lies near its endpoints')."""
    known = start.abilities[:n_models]
    extra = np.repeat(start.abilities.mean(axis=0, keepdims=True), n_models - len(known), axis=0)
    return np.concatenate([known, extra]), start.alpha, start.beta


def _held_out_bias_squared(
    y: np.ndarray, *, dims: int, n_anchors: int, seed: int, initial: tuple[np.ndarray, ...] | None = None
) -> float:
    """gp-IRT's lambda needs p-IRT's squared error on models the fit has not seen: cross-validated over models.

    In-sample errors are near zero (each item's few parameters can memorise 3-5 models), which would make
    gp-IRT trust p-IRT blindly. Each fold's anchors are chosen from that fold's own fit, as the real anchors
    are from the full fit: anchors chosen with the held-out models would flatter p-IRT. With one fitted
    model there is nothing to leave out: p-IRT is not trusted.
    """
    if len(y) < 2:
        return 1.0
    errors = []
    folds = min(len(y), _BIAS_FOLDS)
    for fold in range(folds):
        held_out = np.arange(len(y)) % folds == fold
        rng = np.random.default_rng(seed)
        start = None if initial is None else (initial[0][~held_out], initial[1], initial[2])
        abilities, alpha, beta = _fit_map(y[~held_out], dims=dims, rng=rng, initial=start)
        anchors, weights = _cluster_anchors(np.column_stack([alpha, beta]), n_anchors=n_anchors, rng=rng)
        estimator = AnchorEstimator(
            alpha=alpha, beta=beta, abilities=abilities, anchors=anchors, weights=weights, irt_bias_squared=0.0
        )
        errors += [estimator.p_irt(row[anchors]) - row.mean() for row in y[held_out]]
    return float(np.mean(np.square(errors)))


def _fit_map(
    y: np.ndarray, *, dims: int, rng: np.random.Generator, initial: tuple[np.ndarray, ...] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MAP abilities and item parameters by full-batch Adam on the Bernoulli log-likelihood plus the priors,
    from small random values, or for ``_REFIT_STEPS`` from ``initial`` (abilities, alpha, beta)."""
    n_models, n_items = y.shape
    if initial is None:
        params, steps = (
            [rng.normal(0, 0.1, (n_models, dims)), rng.normal(0, 0.1, (n_items, dims)), np.zeros(n_items)],
            _FIT_STEPS,
        )
    else:
        params, steps = [np.array(p, dtype=float) for p in initial], _REFIT_STEPS
    first = [np.zeros_like(p) for p in params]
    second = [np.zeros_like(p) for p in params]
    for step in range(1, steps + 1):
        theta, alpha, beta = params
        residual = _sigmoid(theta @ alpha.T - beta) - y  # d(negative log-likelihood) / d(logit)
        gradients = [
            residual @ alpha + theta,
            residual.T @ theta + alpha / _ALPHA_PRIOR_SD**2,
            -residual.sum(axis=0) + beta / _BETA_PRIOR_SD**2,
        ]
        for index, gradient in enumerate(gradients):
            first[index] = 0.9 * first[index] + 0.1 * gradient
            second[index] = 0.999 * second[index] + 0.001 * gradient**2
            corrected = first[index] / (1 - 0.9**step)
            params[index] = params[index] - _FIT_LEARNING_RATE * corrected / (
                np.sqrt(second[index] / (1 - 0.999**step)) + 1e-8
            )
    return params[0], params[1], params[2]


def _nearest_centre(features: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Each item's nearest centre, by |x - c|^2 = |x|^2 - 2 x.c + |c|^2: one matrix product instead of an
    items x centres x features array (14,000 items x 100 centres, 50 rounds, per fit)."""
    squared = (centres**2).sum(-1)[None, :] - 2.0 * features @ centres.T
    return squared.argmin(axis=1)  # |x|^2 is the same for every centre


def _cluster_anchors(
    features: np.ndarray, *, n_anchors: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """k-means (k-means++ start) on item parameters; each cluster's anchor is its item nearest the centre.

    Items with identical parameters can leave a cluster empty; it is dropped, so there may be fewer anchors.
    """
    picks = [int(rng.integers(len(features)))]
    nearest = ((features - features[picks[0]]) ** 2).sum(-1)  # each item's squared distance to its nearest pick
    while len(picks) < n_anchors:
        odds = nearest
        if odds.sum() == 0:  # the rest duplicate a centre already picked: any unpicked item will do
            odds = np.ones(len(features))
            odds[picks] = 0.0
        picks.append(int(rng.choice(len(features), p=odds / odds.sum())))
        nearest = np.minimum(nearest, ((features - features[picks[-1]]) ** 2).sum(-1))
    centres = features[picks]
    for _ in range(_KMEANS_ROUNDS):
        labels = _nearest_centre(features, centres)
        counts = np.bincount(labels, minlength=n_anchors)
        sums = np.stack([np.bincount(labels, weights=column, minlength=n_anchors) for column in features.T], axis=1)
        occupied = counts > 0
        centres = np.where(occupied[:, None], sums / np.maximum(counts, 1)[:, None], centres)
    labels = _nearest_centre(features, centres)
    anchors, weights = [], []
    for cluster in range(n_anchors):
        members = np.flatnonzero(labels == cluster)
        if members.size == 0:
            continue
        nearest = members[((features[members] - centres[cluster]) ** 2).sum(-1).argmin()]
        anchors.append(nearest)
        weights.append(members.size / len(features))
    return np.asarray(anchors), np.asarray(weights)
