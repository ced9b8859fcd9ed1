"""The optimizer interface: pycma's ask/tell, one generation at a time, with a state that checkpoints.

Contract every backend keeps (tests/test_optimizers.py checks it for all of them):

* `ask()` returns one generation of `Proposal`s; `tell()` takes exactly those proposals (any order)
  with one score tuple each, all objectives maximized. One generation is in flight at a time.
* Backends with `asks_one_at_a_time` (optuna's samplers, random search; not CMA-ES, whose update needs
  a whole generation) also serve the asynchronous loop: `ask_one()` returns one `Proposal`, `tell_one()`
  takes one back, with any number in flight. A run uses one style or the other, never both at once.
* Ids count 0, 1, 2, ... over the whole run, so a proposal's id names it in logs and in optuna.db.
* A score that is not finite (NaN, +-inf, None) marks a failed candidate; `FailurePenalty` replaces
  it by a finite value that ranks below every score seen so far, because cma ranks NaN arbitrarily
  and optuna's samplers ignore failed trials (TPE then keeps proposing the failing region).
* `state_dict()` is plain data (bytes, numbers, lists, the space's frozen dimensions) that pickles.
  Loading it into a freshly constructed optimizer of the same config continues with exactly the
  proposals an uninterrupted run would make. Called between `ask()` and `tell()`, it returns the state
  from before that `ask()`: a crash mid-generation resumes by asking the same generation again.
  One at a time, it holds the candidates asked and not yet told; after loading, `in_flight()` returns
  them and each is told as if there had been no interruption.
  The dict returned between generations is kept (the next `ask()` reuses it instead of serializing the
  backend again): treat it as read-only.
* All randomness comes from the constructor's seed; no global random state is read or written.
* `close()` at the end of a run waits for what a backend writes in the background (optuna.db).
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.optimizer.space import SearchSpace


@dataclass(frozen=True, kw_only=True, eq=False)
class Proposal:
    """One candidate: a run-wide id and a point of the space (binary dims exactly 0.0 or 1.0)."""

    id: int
    x: np.ndarray

    def __post_init__(self) -> None:
        # A read-only copy: callers must not be able to edit what the optimizer will be told about.
        x = np.array(self.x, dtype=float)
        x.setflags(write=False)
        object.__setattr__(self, "x", x)


class FailurePenalty:
    """Replaces non-finite scores, objective by objective, with `lowest - max(1, highest - lowest)`.

    `lowest`/`highest` span the finite scores seen so far (this generation included), so a failure
    ranks below every candidate evaluated up to then while staying on the scale of real scores; a huge
    constant would squash NSGA-II's crowding distances and MOTPE's hypervolume reference point. With no
    finite score seen yet the penalty is -1.
    """

    def __init__(self, *, n_objectives: int) -> None:
        self.lowest = np.full(n_objectives, np.inf)
        self.highest = np.full(n_objectives, -np.inf)

    def apply(self, scores: np.ndarray) -> np.ndarray:
        finite = np.isfinite(scores)
        self.lowest = np.minimum(self.lowest, np.where(finite, scores, np.inf).min(axis=0))
        self.highest = np.maximum(self.highest, np.where(finite, scores, -np.inf).max(axis=0))
        seen = np.isfinite(self.lowest)
        lowest = np.where(seen, self.lowest, 0.0)
        highest = np.where(seen, self.highest, 0.0)
        return np.where(finite, scores, lowest - np.maximum(1.0, highest - lowest))

    def state_dict(self) -> dict[str, Any]:
        return {"lowest": self.lowest.tolist(), "highest": self.highest.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lowest = np.array(state["lowest"], dtype=float)
        self.highest = np.array(state["highest"], dtype=float)


class Optimizer(abc.ABC):
    """Ask/tell over a `SearchSpace`; backends fill in the four abstract `_` methods at the bottom, and
    the two `_..._one` methods when they set `asks_one_at_a_time`."""

    asks_one_at_a_time = False
    starts_at_a_point = False  # whether it honours the space's start point (CMA-ES's x0)

    def __init__(self, *, space: SearchSpace, n_objectives: int) -> None:
        if not isinstance(n_objectives, int) or n_objectives < 1:
            raise ValueError(f"n_objectives must be a positive int, got {n_objectives!r}")
        if space.start is not None and not self.starts_at_a_point:
            raise EvomergeError(
                f"genome.start gives the search a point to start around, but {type(self).__name__} has none: "
                "optuna's samplers and random search draw their first candidates over the whole space",
                "use optimizer=cmaes (its sigma0 sets the step around the start), or genome.start=null",
            )
        self.space = space
        self.n_objectives = n_objectives
        self._penalty = FailurePenalty(n_objectives=n_objectives)
        self._pending: list[Proposal] | None = None
        self._state_before_ask: dict[str, Any] | None = None
        self._state_between: dict[str, Any] | None = None  # what state_dict() last returned, until a change
        self._in_flight: dict[int, Proposal] = {}  # asked one at a time, not yet told

    def selected_count(self) -> int | None:
        """How many of a generation's best candidates the update uses (CMA-ES's mu), or None when the
        backend does not select a top set (racing then only asks which candidate can be the best)."""
        return None

    def ask(self) -> list[Proposal]:
        if self._pending is not None:
            raise RuntimeError("ask() called twice: tell() the previous generation first")
        if self._in_flight:
            raise RuntimeError("ask() called while candidates asked one at a time are in flight")
        # The search loop asked for the state after the last tell to checkpoint it: reuse it rather than
        # serialize the backend again while the workers wait for this generation.
        self._state_before_ask = self._state_between or self.state_dict()
        self._state_between = None
        self._pending = self._ask_generation()
        return list(self._pending)

    def tell(self, proposals: Sequence[Proposal], scores: Sequence[Sequence[float | None]]) -> None:
        if self._pending is None:
            raise RuntimeError("tell() called without a generation in flight: ask() first")
        pending_ids = [proposal.id for proposal in self._pending]
        told_ids = [proposal.id for proposal in proposals]
        if sorted(told_ids) != sorted(pending_ids) or len(scores) != len(told_ids):
            raise ValueError(
                f"tell() takes the proposals of the last ask() (ids {pending_ids}) with one score tuple "
                f"each; got ids {told_ids} and {len(scores)} score tuples"
            )
        values = np.array(scores, dtype=float).reshape(len(told_ids), -1)
        if values.shape[1] != self.n_objectives:
            raise ValueError(f"each score tuple needs {self.n_objectives} values, got {values.shape[1]}")
        # Tell in ask order whatever order the loop evaluated in: the backends' updates depend on order,
        # and a resumed run must not diverge because its workers finished differently.
        row_of_id = {proposal_id: row for row, proposal_id in enumerate(told_ids)}
        values = values[[row_of_id[proposal_id] for proposal_id in pending_ids]]
        failed = ~np.isfinite(values).all(axis=1)
        self._tell_generation(self._pending, self._penalty.apply(values), failed)
        self._pending = None
        self._state_before_ask = None
        self._state_between = None

    def ask_one(self) -> Proposal:
        if not self.asks_one_at_a_time:
            raise RuntimeError(f"{type(self).__name__} asks whole generations only: use ask()")
        if self._pending is not None:
            raise RuntimeError("ask_one() called while a generation is in flight: tell() it first")
        self._state_between = None
        proposal = self._ask_one()
        self._in_flight[proposal.id] = proposal
        return proposal

    def tell_one(self, proposal: Proposal, scores: Sequence[float | None]) -> None:
        if proposal.id not in self._in_flight:
            raise ValueError(f"tell_one() takes a proposal asked by ask_one() and not told yet; got id {proposal.id}")
        values = np.array(scores, dtype=float).reshape(1, -1)
        if values.shape[1] != self.n_objectives:
            raise ValueError(f"each score tuple needs {self.n_objectives} values, got {values.shape[1]}")
        self._state_between = None
        failed = not np.isfinite(values).all()
        self._tell_one(self._in_flight.pop(proposal.id), self._penalty.apply(values)[0], failed)

    def close(self) -> None:  # noqa: B027 - most backends run nothing in the background
        """Finish what the backend does in the background (optuna: the last refresh of optuna.db)."""

    def in_flight(self) -> list[Proposal]:
        """The candidates asked by `ask_one()` and not told yet, in ask order."""
        return list(self._in_flight.values())

    def state_dict(self) -> dict[str, Any]:
        if self._state_before_ask is not None:
            return copy.deepcopy(self._state_before_ask)
        if self._state_between is None:
            self._state_between = {
                "optimizer": type(self).__name__,
                "space": self.space.dims,
                "n_objectives": self.n_objectives,
                "penalty": self._penalty.state_dict(),
                "algorithm": self._algorithm_state(),
                "in_flight": [(proposal.id, proposal.x.tolist()) for proposal in self._in_flight.values()],
            }
        return self._state_between

    def load_state_dict(self, state: dict[str, Any]) -> None:
        written_by = (state["optimizer"], tuple(state["space"]), state["n_objectives"])
        if written_by != (type(self).__name__, self.space.dims, self.n_objectives):
            raise EvomergeError(
                f"the checkpoint was written by {state['optimizer']} over {len(state['space'])} dimensions"
                f" with {state['n_objectives']} objectives, but this run configures {type(self).__name__}"
                f" over {len(self.space)} dimensions with {self.n_objectives} objectives",
                "Resume with the run's original config (it is saved in the run folder), or start a new run",
            )
        self._penalty.load_state_dict(state["penalty"])
        self._load_algorithm_state(state["algorithm"])
        self._pending = None
        self._state_before_ask = None
        self._state_between = None
        self._in_flight = {i: Proposal(id=i, x=np.array(x)) for i, x in state.get("in_flight", [])}

    @abc.abstractmethod
    def _ask_generation(self) -> list[Proposal]: ...

    @abc.abstractmethod
    def _tell_generation(self, proposals: list[Proposal], scores: np.ndarray, failed: np.ndarray) -> None:
        """`scores` is finite, shape (len(proposals), n_objectives), in ask order; `failed` flags rows
        that had a non-finite score."""

    @abc.abstractmethod
    def _algorithm_state(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def _load_algorithm_state(self, state: dict[str, Any]) -> None: ...

    def _ask_one(self) -> Proposal:
        raise NotImplementedError  # only backends with asks_one_at_a_time

    def _tell_one(self, proposal: Proposal, scores: np.ndarray, failed: bool) -> None:
        """`scores` is finite, shape (n_objectives,); `failed`: it had a non-finite score."""
        raise NotImplementedError
