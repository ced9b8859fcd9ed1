"""CMA-ES through pycma (Hansen 2016, arXiv:1604.00772), as Akiba et al. (2024) use for merge recipes."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import cma
import numpy as np
from threadpoolctl import ThreadpoolController

from evomerge.errors import EvomergeError
from evomerge.optimizer.base import Optimizer, Proposal
from evomerge.optimizer.space import SearchSpace

# pycma decomposes its d x d covariance in numpy's BLAS, which spreads the work over every core; while
# the workers hold those cores its threads wait on each other (30 dims on the 2-core test box under load:
# 5.2 ms per decomposition on two threads, 0.6 ms on one), and the workers wait for the next generation.
# One thread, only around pycma's calls.
_BLAS = ThreadpoolController()


class _GeneratorNormal:
    """pycma's `randn(lam, N)` option, drawn from our own Generator.

    pycma otherwise samples from, and seeds, numpy's global RandomState. Living inside the es, the
    Generator pickles with it, so one pickle holds the whole state.
    """

    def __init__(self, generator: np.random.Generator) -> None:
        self.generator = generator

    def __call__(self, *shape: int) -> np.ndarray:
        return self.generator.standard_normal(shape)


class CMAESOptimizer(Optimizer):
    """Single-objective CMA-ES in the unit box; binary dims are continuous to CMA and thresholded at 0.5.

    It starts at the space's start point when the genome gives one (a DFS path of one source), else at
    the centre of the box, with step size sigma0 (unit-box units) around it. A genome's start point is
    itself the first candidate of the first generation: sampled around, a DFS start is rarely hit
    (its on/off genes sit on the box's faces), and a search must not end below the model it started
    from without knowing it. The centre of the box is not scored (see `__init__`).

    CMA is told the continuous values it asked, not the thresholded ones, so its distribution update
    stays consistent. Bounds use pycma's default `BoundTransform`, so every asked point is in the box.
    """

    starts_at_a_point = True

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
        del run_dir  # all of CMA's state is in state_dict(); nothing to keep in the run folder
        if n_objectives != 1:
            raise EvomergeError(
                f"cmaes optimizes a single objective, but this run has {n_objectives} objectives",
                "Choose optimizer=nsga2 or optimizer=tpe for several objectives, or score one metric",
            )
        if not sigma0 > 0:
            raise EvomergeError(f"optimizer.sigma0 is {sigma0}", "Give a step size > 0 in unit-box units (e.g. 0.25)")
        if popsize is not None and popsize < 2:
            raise EvomergeError(f"optimizer.popsize is {popsize}", "Give popsize >= 2, or null for cma's default")
        super().__init__(space=space, n_objectives=n_objectives)
        # pycma does not support 1-D problems: in 1-D its bound handling sets a per-coordinate scaling
        # before it knows the dimension and raises (sigma0 >= 0.5 in the unit box; pycma issues 86
        # and 302). Its maintainer's workaround: search 2-D and ignore the second coordinate.
        dimension = max(len(space), 2)
        options = {
            "bounds": [[0.0] * dimension, [1.0] * dimension],
            "randn": _GeneratorNormal(np.random.default_rng(seed)),
            "seed": np.nan,  # nan: pycma leaves numpy's global seed alone
            "verbose": -9,
            "verb_log": 0,  # no outcmaes/ files in the working directory
            "verb_disp": 0,
        }
        if popsize is not None:
            options["popsize"] = popsize
        x0 = [0.5] * dimension if space.start is None else [*space.start, 0.5][:dimension]
        self._es = cma.CMAEvolutionStrategy(x0, sigma0, options)
        if space.start is not None:
            # pycma's mean is x0 in its genotype (the bounds are a transform). Injected with force, it
            # takes the place of the first generation's first sample (the population stays popsize),
            # comes back from ask() as x0 itself, and is ranked with the rest, so CMA-ES knows when
            # its start beats every sample. The pending injection lives in the es and pickles with it.
            # Not the centre of the box: on a DFS box it thresholds to every slot on, and on a
            # parameter-space box its zero step in the rank-mu update shrinks the covariance (ties, 4
            # genes, popsize 8, 160 evaluations, 12 seeds: median best -0.095 injected, -0.032 not).
            self._es.inject([self._es.mean.copy()], force=True)
        self._next_id = 0
        self._asked_unit: np.ndarray | None = None

    def selected_count(self) -> int:
        # The parents CMA-ES recombines. The rest's order matters too: pycma's active CMA (on by default)
        # weights the worst lambda - mu negatively, so a race tells every candidate a full-task estimate.
        return int(self._es.sp.weights.mu)

    def _ask_generation(self) -> list[Proposal]:
        with _BLAS.limit(limits=1, user_api="blas"):
            self._asked_unit = np.array(self._es.ask())
        ids = range(self._next_id, self._next_id + len(self._asked_unit))
        self._next_id += len(self._asked_unit)
        unit = self._asked_unit[:, : len(self.space)]
        return [Proposal(id=i, x=x) for i, x in zip(ids, self.space.from_unit(unit), strict=True)]

    def _tell_generation(self, proposals: list[Proposal], scores: np.ndarray, failed: np.ndarray) -> None:
        with _BLAS.limit(limits=1, user_api="blas"):
            self._es.tell(list(self._asked_unit), (-scores[:, 0]).tolist())  # pycma minimizes
        self._asked_unit = None

    def _algorithm_state(self) -> dict[str, Any]:
        return {"es": pickle.dumps(self._es), "next_id": self._next_id}

    def _load_algorithm_state(self, state: dict[str, Any]) -> None:
        self._es = pickle.loads(state["es"])
        self._next_id = state["next_id"]
        self._asked_unit = None
