"""NSGA-II and TPE through optuna's samplers, on an in-memory study mirrored to run_dir/optuna.db.

The study is the whole state. Each trial is asked from a sampler built afresh with a seed derived from
the run's seed and the trial's number (`trial_seed`), so no sampler object carries state from one ask
to the next: nothing but the study's trials and system attrs has to survive a resume. (Pickling the
sampler, optuna's older advice, broke with optuna 5.1, whose NSGA-II sampler holds a thread lock.)
NSGA-II keeps its generation bookkeeping in the study's system attrs, so the rebuilt study is the one
the sampler left.

Why optuna's own storage (RDB or journal) is not the resume state: exact resume needs the study as it
was at the loop's checkpoint, and optuna lacks a public way to cut a study back to an earlier point.
Its storages commit every ask and tell on their own, so a kill between a tell and the checkpoint leaves
the storage ahead of it; optuna has no API to delete a trial or to revert a COMPLETE one, and rolling
a journal file back would mean truncating its private log format. So the checkpoint holds the study,
and optuna.db is a mirror (refreshed after each generation, for optuna's dashboard and
`optuna.load_study`) that resume never reads.

`state_dict()` holds the completed trials with their system attrs and the study's system attrs. Asked
one at a time, the trials in flight are in it too, as running trials (TPE's constant liar counts them);
a whole generation in flight is not (it is asked again). A checkpoint written before this scheme also
holds a pickled sampler, which is ignored: such a run resumes with the per-trial seeds, so its later
proposals differ from those the old version would have made.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from evomerge.errors import EvomergeError
from evomerge.optimizer.base import Optimizer, Proposal
from evomerge.optimizer.space import BinaryDim, SearchSpace

STUDY_NAME = "evomerge"
_WRITTEN_KEY = "evomerge:written"


class OptunaOptimizer(Optimizer):
    """Asks `batch_size` trials per generation on a study maximizing every objective, or one trial at a
    time (optuna.db is then refreshed after every `batch_size` trials told). `sampler(seed)` builds the
    sampler that asks one trial."""

    asks_one_at_a_time = True

    def __init__(
        self,
        *,
        space: SearchSpace,
        n_objectives: int,
        sampler: Callable[[int], optuna.samplers.BaseSampler],
        seed: int,
        batch_size: int,
        run_dir: Path | str | None,
        pruner: str | None = None,
    ) -> None:
        super().__init__(space=space, n_objectives=n_objectives)
        self.batch_size = batch_size
        self._pruner = _pruner(pruner, n_objectives=n_objectives)
        self._sampler = sampler
        self._seed = seed
        self._distributions: dict[str, BaseDistribution] = {
            dim.name: CategoricalDistribution((0, 1))
            if isinstance(dim, BinaryDim)
            else FloatDistribution(dim.low, dim.high)
            for dim in space
        }
        self._storage, self._study = self._new_study()
        self._study_file = None if run_dir is None else OptunaStudyFile(path=Path(run_dir) / "optuna.db")

    def _new_study(self) -> tuple[optuna.storages.BaseStorage, optuna.Study]:
        storage = optuna.storages.InMemoryStorage()
        study = optuna.create_study(
            storage=storage,
            study_name=STUDY_NAME,
            directions=["maximize"] * self.n_objectives,
        )
        return storage, study

    def _study_id(self) -> int:
        return self._storage.get_study_id_from_name(STUDY_NAME)

    def _ask_generation(self) -> list[Proposal]:
        return [self._ask_one() for _ in range(self.batch_size)]

    def _tell_generation(self, proposals: list[Proposal], scores: np.ndarray, failed: np.ndarray) -> None:
        for proposal, row, trial_failed in zip(proposals, scores, failed, strict=True):
            self._tell_trial(proposal.id, row, trial_failed)
        self._refresh_study_file()

    def _ask_one(self) -> Proposal:
        trial = self._study_for(len(self._study.get_trials(deepcopy=False))).ask(self._distributions)
        return Proposal(id=trial.number, x=np.array([trial.params[name] for name in self.space.names], dtype=float))

    def _tell_one(self, proposal: Proposal, scores: np.ndarray, failed: bool) -> None:
        self._tell_trial(proposal.id, scores, failed)
        if (proposal.id + 1) % self.batch_size == 0:
            self._refresh_study_file()

    def _tell_trial(self, number: int, scores: np.ndarray, failed: bool) -> None:
        # Failures are told as COMPLETE with the penalty, not as FAIL: optuna counts only complete trials
        # toward an NSGA-II generation (a FAIL stretches the generation into the next batch), and TPE
        # drops failed trials, so it keeps proposing the region that fails.
        if failed:
            trial_id = self._storage.get_trial_id_from_study_id_trial_number(self._study_id(), number)
            self._storage.set_trial_user_attr(trial_id, "failed", True)
        self._study_for(number).tell(number, scores.tolist())

    def _study_for(self, number: int) -> optuna.Study:
        """The study as seen by the sampler of trial `number`, which asks and is told that trial."""
        sampler = self._sampler(trial_seed(self._seed, number))
        return optuna.load_study(study_name=STUDY_NAME, storage=self._storage, sampler=sampler, pruner=self._pruner)

    @property
    def prunes(self) -> bool:
        return self._pruner is not None

    def should_prune(self, proposal: Proposal, step: int, value: float) -> bool:
        """Report ``value`` (the candidate's estimate after ``step`` items) and let optuna's pruner decide
        whether scoring it on more items is worth it (`Trial.report`, `Trial.should_prune`)."""
        study = self._study_for(proposal.id)
        trial_id = self._storage.get_trial_id_from_study_id_trial_number(self._study_id(), proposal.id)
        trial = optuna.trial.Trial(study, trial_id)
        trial.report(value, step)
        return trial.should_prune()

    def close(self) -> None:
        if self._study_file is not None:
            self._study_file.wait()

    def _refresh_study_file(self) -> None:
        if self._study_file is not None:
            self._study_file.refresh(trials=self._completed_trials(), n_objectives=self.n_objectives)

    def _completed_trials(self) -> list[FrozenTrial]:
        return self._study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

    def _algorithm_state(self) -> dict[str, Any]:
        return {
            "seed": self._seed,
            "study_system_attrs": dict(self._storage.get_study_system_attrs(self._study_id())),
            "trials": [_trial_record(trial) for trial in self._completed_trials()],
            "running": [_trial_record(trial) for trial in self._study.get_trials(states=(TrialState.RUNNING,))],
        }

    def _load_algorithm_state(self, state: dict[str, Any]) -> None:
        self._seed = state.get("seed", self._seed)
        self._storage, self._study = self._new_study()
        for key, value in state["study_system_attrs"].items():
            self._storage.set_study_system_attr(self._study_id(), key, value)
        # Numbered in the order added: completed and running trials together, by number.
        records = sorted([*state["trials"], *state.get("running", [])], key=lambda record: record["number"])
        self._study.add_trials([self._trial_from_record(record) for record in records])

    def _trial_from_record(self, record: dict[str, Any]) -> FrozenTrial:
        running = record["values"] is None
        return FrozenTrial(
            number=record["number"],
            trial_id=record["number"],
            state=TrialState.RUNNING if running else TrialState.COMPLETE,
            value=None,
            values=record["values"],
            datetime_start=datetime.datetime.fromisoformat(record["datetime_start"]),
            datetime_complete=None if running else datetime.datetime.fromisoformat(record["datetime_complete"]),
            params=record["params"],
            distributions=self._distributions,
            user_attrs=record["user_attrs"],
            system_attrs=record["system_attrs"],
            # The pruner compares a trial's rounds with earlier trials' at the same step.
            intermediate_values={int(step): value for step, value in record.get("intermediate_values", [])},
        )


class NSGA2Optimizer(OptunaOptimizer):
    """NSGA-II (Deb et al. 2002, doi:10.1109/4235.996017) via `optuna.samplers.NSGAIISampler`."""

    def __init__(
        self,
        *,
        space: SearchSpace,
        n_objectives: int,
        seed: int,
        run_dir: Path | str | None = None,
        population_size: int = 20,
        mutation_prob: float | None = None,
        crossover_prob: float = 0.9,
        swapping_prob: float = 0.5,
    ) -> None:
        if population_size < 2:
            raise EvomergeError(f"optimizer.population_size is {population_size}", "Give population_size >= 2")

        def sampler(trial_seed: int) -> optuna.samplers.BaseSampler:
            return optuna.samplers.NSGAIISampler(
                population_size=population_size,
                mutation_prob=mutation_prob,
                crossover_prob=crossover_prob,
                swapping_prob=swapping_prob,
                seed=trial_seed,
            )

        # One of our generations is exactly one NSGA-II population: optuna dates a trial's generation when
        # it is asked, by counting completed trials, so any other batch size would blur generations.
        super().__init__(
            space=space,
            n_objectives=n_objectives,
            sampler=sampler,
            seed=seed,
            batch_size=population_size,
            run_dir=run_dir,
        )


class TPEOptimizer(OptunaOptimizer):
    """Tree-structured Parzen estimator (Watanabe 2023, arXiv:2304.11127) via `optuna.samplers.TPESampler`.

    Candidates of one generation are asked before any is told; optuna 5's default `constant_liar=True`
    counts the ones still running as bad, which spreads a batch out instead of repeating one proposal.
    """

    def __init__(
        self,
        *,
        space: SearchSpace,
        n_objectives: int,
        seed: int,
        run_dir: Path | str | None = None,
        batch_size: int = 20,
        n_startup_trials: int = 20,
        multivariate: bool = True,
        pruner: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise EvomergeError(f"optimizer.batch_size is {batch_size}", "Give batch_size >= 1")

        def sampler(trial_seed: int) -> optuna.samplers.BaseSampler:
            return optuna.samplers.TPESampler(
                n_startup_trials=n_startup_trials, multivariate=multivariate, seed=trial_seed
            )

        super().__init__(
            space=space,
            n_objectives=n_objectives,
            sampler=sampler,
            seed=seed,
            batch_size=batch_size,
            run_dir=run_dir,
            pruner=pruner,
        )


class OptunaStudyFile:
    """run_dir/optuna.db: the completed trials as an optuna SQLite study, for people and optuna-dashboard.

    Each refresh copies the file, appends the new trials to the copy and renames it over the original,
    so a kill leaves the previous version whole. It appends rather than rewrites because optuna's RDB
    storage writes a trial in tens of milliseconds (more with many parameters). The file records how
    many trials it holds and their digest, so a refresh after a resume can tell whether the file is still
    a prefix of this run's history; when it is not (it ran ahead and the rerun scored differently) the
    study in it is rebuilt.

    Those tens of milliseconds per trial would hold up every tell, and the workers waiting for the next
    candidate with it, so refreshes run on a thread of their own: one asked while another is writing
    is merged into the next write (the newest trials win). `wait()` returns once the file is current.
    """

    def __init__(self, *, path: Path) -> None:
        self.path = path
        self._writer = ThreadPoolExecutor(max_workers=1)
        self._lock = threading.Lock()
        self._wanted: tuple[list[FrozenTrial], int] | None = None  # the newest trials not written yet
        self._writing = False
        self._written: Future | None = None

    def refresh(self, *, trials: list[FrozenTrial], n_objectives: int) -> None:
        """Have the file hold ``trials`` (completed trials, which optuna no longer changes) soon."""
        if self._written is not None and self._written.done():
            self._written.result()  # a failed write surfaces here, on the search's thread
        with self._lock:
            self._wanted = (list(trials), n_objectives)
            if self._writing:
                return
            self._writing = True
        self._written = self._writer.submit(self._write_wanted)

    def wait(self) -> None:
        if self._written is not None:
            self._written.result()

    def _write_wanted(self) -> None:
        while True:
            with self._lock:
                wanted, self._wanted = self._wanted, None
                if wanted is None:
                    self._writing = False
                    return
            try:
                self._write(*wanted)
            except BaseException:
                with self._lock:
                    self._writing = False
                raise

    def _write(self, trials: list[FrozenTrial], n_objectives: int) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        partial.unlink(missing_ok=True)
        if self.path.exists():
            shutil.copyfile(self.path, partial)
        storage = optuna.storages.RDBStorage(f"sqlite:///{partial}")
        try:
            study_id, n_written = self._study_holding_prefix(storage, trials, n_objectives)
            for trial in trials[n_written:]:
                storage.create_new_trial(study_id, template_trial=trial)
            storage.set_study_system_attr(study_id, _WRITTEN_KEY, {"n_trials": len(trials), "digest": _digest(trials)})
        finally:
            storage.remove_session()
            storage.engine.dispose()
        os.replace(partial, self.path)

    def _study_holding_prefix(
        self, storage: optuna.storages.RDBStorage, trials: list[FrozenTrial], n_objectives: int
    ) -> tuple[int, int]:
        """The file's study and how many of `trials` it holds, or a new empty study if it holds others."""
        directions = [optuna.study.StudyDirection.MAXIMIZE] * n_objectives
        try:
            study_id = storage.get_study_id_from_name(STUDY_NAME)
        except KeyError:
            return storage.create_new_study(directions, STUDY_NAME), 0
        written = storage.get_study_system_attrs(study_id).get(_WRITTEN_KEY, {"n_trials": -1})
        n_written = written["n_trials"]
        if 0 <= n_written <= len(trials) and written["digest"] == _digest(trials[:n_written]):
            return study_id, n_written
        storage.delete_study(study_id)
        return storage.create_new_study(directions, STUDY_NAME), 0


def trial_seed(seed: int, number: int) -> int:
    """The seed of the sampler that asks trial `number` of a run seeded `seed`."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def _trial_record(trial: FrozenTrial) -> dict[str, Any]:
    return {
        "number": trial.number,
        "params": dict(trial.params),
        "values": None if trial.values is None else list(trial.values),
        "user_attrs": dict(trial.user_attrs),
        "system_attrs": dict(trial.system_attrs),
        "datetime_start": trial.datetime_start.isoformat(),
        "datetime_complete": None if trial.datetime_complete is None else trial.datetime_complete.isoformat(),
        "intermediate_values": sorted(trial.intermediate_values.items()),
    }


PRUNERS = {"successive_halving": optuna.pruners.SuccessiveHalvingPruner, "hyperband": optuna.pruners.HyperbandPruner}


def _pruner(name: str | None, *, n_objectives: int) -> optuna.pruners.BasePruner | None:
    """optuna's pruner by name, with its defaults; racing's rounds are its steps (items scored so far)."""
    if name is None:
        return None
    if name not in PRUNERS:
        raise EvomergeError(
            f"optimizer.pruner is '{name}'", f"use one of {', '.join(PRUNERS)}, or null to score every item"
        )
    if n_objectives != 1:
        raise EvomergeError(
            f"optimizer.pruner={name} with {n_objectives} objectives: optuna does not support pruning in "
            "multi-objective studies (Trial.report raises)",
            "score one objective, or set optimizer.pruner=null",
        )
    return PRUNERS[name]()


def _digest(trials: list[FrozenTrial]) -> str:
    history = [[trial.number, trial.params, trial.values] for trial in trials]
    return hashlib.sha256(json.dumps(history, sort_keys=True).encode()).hexdigest()
