"""lq-CMA-ES (Hansen 2019, arXiv:1904.07801): CMA-ES whose linear-quadratic surrogate decides which of
a generation's samples are truly scored; the others are told the surrogate's values.

pycma implements it as `cma.fitness_models.SurrogatePopulation`, a callable that calls the fitness
function itself, one sample at a time, until the surrogate ranks the samples it scored as they truly
rank. Here the search loop scores candidates, so `SurrogateRound` is that call split at its fitness
calls: `batch()` names the samples to score next, `tell()` takes their scores and says whether the
surrogate is trusted for the rest. It uses pycma's `LQModel` (the surrogate) and
`SurrogatePopulationSettings` (when to trust it); tests/test_lq_cmaes.py checks it step for step
against pycma's own `SurrogatePopulation`, so a pycma release that changes it fails there.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from cma.fitness_models import LQModel, SurrogatePopulationSettings

from evomerge.optimizer.base import Proposal
from evomerge.optimizer.cmaes import _BLAS, CMAESOptimizer
from evomerge.optimizer.space import SearchSpace

_SETTINGS = SurrogatePopulationSettings  # pycma's defaults, read as class attributes


class SurrogateRound:
    """One pycma generation `samples` (minimized) under the surrogate `model`, which it updates.

    The batches, the model updates and the returned values are those of `SurrogatePopulation.__call__`
    (pycma 4.x): the samples the model ranks best are scored, first `1 + max(2 % of popsize,
    3 / truncation_ratio - model size)` of them, then half as many more after each batch, until
    Kendall's tau between the model and the true values of its latest data reaches 0.85 or every
    sample is scored.
    """

    def __init__(self, model: LQModel, samples: np.ndarray) -> None:
        self.model = model
        self.samples = samples
        self.values = np.full(len(samples), np.nan)  # true values; nan: not scored
        # The model's archive holds a multiple of the population; a larger population (a restart)
        # starts a new model, as SurrogatePopulation does.
        size = _SETTINGS.model_max_size_factor * len(samples)
        if size > model.settings.max_absolute_size:
            if model.settings.max_absolute_size:
                model.reset()
            model.settings.max_absolute_size = size
        self.target = int(
            1 + max(len(samples) * _SETTINGS.min_evals_percent / 100, 3 / model.settings.truncation_ratio - model.size)
        )

    @property
    def scored(self) -> int:
        return int(np.sum(~np.isnan(self.values)))

    def batch(self) -> list[int]:
        """Indices of the samples to score next: the unscored ones the model ranks best, up to the target."""
        if self.model.size > 1:
            order = np.argsort([self.model.eval(x) for x in self.samples])
        else:
            order = range(len(self.samples))  # no model yet: in the order CMA-ES sampled them
        unscored = [int(i) for i in order if np.isnan(self.values[i])]
        return unscored[: self.target - self.scored]

    def tell(self, indices: Sequence[int], values: Sequence[float]) -> bool:
        """The true values of a batch, in `batch()` order; True when the round is over."""
        for i, value in zip(indices, values, strict=True):
            self.values[i] = value
            self.model.add_data_row(self.samples[i], value)
        self.model.sort(self.target)
        tau = self.model.kendall(_SETTINGS.n_for_tau(len(self.samples), self.scored))
        fraction = self.scored / len(self.samples)
        if tau >= _SETTINGS.tau_truth_threshold - _SETTINGS.tau_truth_threshold_correction * fraction or fraction == 1:
            self.model.sort(_SETTINGS.model_sort_globally or self.scored)
            self.model.adapt_max_relative_size(tau)
            return True
        self.target += math.ceil(self.target / 2)
        return False

    def surrogate_values(self) -> list[float]:
        """What CMA-ES is told: the true values if all are known, else the model's, shifted so that the
        lowest equals the lowest true value (a surrogate value never beats what was really scored)."""
        if self.scored == len(self.samples):
            return self.values.tolist()
        modelled = np.array([self.model.eval(x) for x in self.samples])
        return (modelled - modelled.min() + np.nanmin(self.values)).tolist()


class LQCMAESOptimizer(CMAESOptimizer):
    """CMA-ES with pycma's lq surrogate: each `ask()` returns the samples the surrogate wants scored, so
    one pycma generation can take several asks (the search loop's generations count those asks).

    After each pycma generation the model's optimum is injected into the next, as pycma's
    `fmin_lq_surr2` does. Racing sees no selected top set: the surrogate is fitted to every value told.
    """

    def __init__(
        self,
        *,
        space: SearchSpace,
        n_objectives: int,
        seed: int,
        run_dir: Path | str | None = None,
        popsize: int | None = None,
        sigma0: float = 0.25,
    ) -> None:
        super().__init__(
            space=space, n_objectives=n_objectives, seed=seed, run_dir=run_dir, popsize=popsize, sigma0=sigma0
        )
        self._model = LQModel()
        self._round: SurrogateRound | None = None  # the pycma generation being scored
        self._batch: list[int] = []  # the samples of the round asked last

    def selected_count(self) -> None:
        return None

    def _ask_generation(self) -> list[Proposal]:
        with _BLAS.limit(limits=1, user_api="blas"):  # the model's least squares too
            if self._round is None:
                self._round = SurrogateRound(self._model, np.array(self._es.ask()))
            self._batch = self._round.batch()
        unit = self._round.samples[self._batch, : len(self.space)]
        ids = range(self._next_id, self._next_id + len(unit))
        self._next_id += len(unit)
        return [Proposal(id=i, x=x) for i, x in zip(ids, self.space.from_unit(unit), strict=True)]

    def _tell_generation(self, proposals: list[Proposal], scores: np.ndarray, failed: np.ndarray) -> None:
        with _BLAS.limit(limits=1, user_api="blas"):
            if not self._round.tell(self._batch, (-scores[:, 0]).tolist()):  # pycma minimizes
                return
            self._es.tell(list(self._round.samples), self._round.surrogate_values())
            self._es.inject([self._model.xopt])
        self._round = None

    def _algorithm_state(self) -> dict[str, Any]:
        # One pickle, so that the round and the optimizer still share one model after a resume.
        return {"lq": pickle.dumps((self._es, self._model, self._round)), "next_id": self._next_id}

    def _load_algorithm_state(self, state: dict[str, Any]) -> None:
        self._es, self._model, self._round = pickle.loads(state["lq"])
        self._next_id = state["next_id"]
        self._batch = []
