"""Everything a run needs to continue lives in its folder: config, evaluation log, checkpoint, lock.

- ``config.yaml``: the resolved config the run was started with (resume compares against it);
- ``evaluations.jsonl``: one line per candidate, appended and flushed as each is scored;
- ``checkpoint.pkl``: the search state after the last whole generation, replaced atomically (its
  evaluation cache left out: the log's rows rebuild it);
- ``run.lock``: an advisory lock held while a process drives the run (released by the OS when that
  process dies, even by SIGKILL, so a crash never leaves a stale lock).
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.io.atomic import atomic_write_bytes, atomic_write_text

CONFIG = "config.yaml"
EVALUATIONS = "evaluations.jsonl"
CHECKPOINT = "checkpoint.pkl"
LOCK = "run.lock"


def fully_scored(row: dict) -> bool:
    """Whether a logged candidate was scored on every item: only those are results (the best, export,
    the Pareto front, twin). A row a race stopped early, or one an estimated generation scored on its
    anchors alone, carries ``items: [scored, in the task]`` with fewer scored; its value is an estimate."""
    return "items" not in row or row["items"][0] >= row["items"][1]


class RunFolder:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_handle = None
        self._log_handle = None

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    def lock(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / LOCK, "a+")  # noqa: SIM115 - held open for the run's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise EvomergeError(
                f"run folder '{self.path}' is being driven by {holder}",
                "wait for it to finish or stop it first; two processes must not drive one run",
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self._lock_handle = handle

    def close(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if self._lock_handle is not None:
            fcntl.flock(self._lock_handle, fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None

    def write_config(self, text: str) -> None:
        atomic_write_text(self.config_path, text)

    # -- the evaluation log -------------------------------------------------------------------
    def read_evaluations(self) -> list[dict]:
        path = self.path / EVALUATIONS
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a kill: everything after it is lost anyway
        return rows

    def truncate_evaluations(self, count: int) -> tuple[list[dict], list[dict]]:
        """Keep the first ``count`` rows (the checkpointed ones); return them and the rows dropped after them.

        Rows past the checkpoint were scored by a process that died before its generation was
        checkpointed; the resumed run asks the same candidates again and reuses these scores.
        """
        rows = self.read_evaluations()
        kept, dropped = rows[:count], rows[count:]
        atomic_write_text(self.path / EVALUATIONS, "".join(json.dumps(row) + "\n" for row in kept))
        return kept, dropped

    def append_evaluation(self, row: dict) -> None:
        if self._log_handle is None:
            self._log_handle = open(self.path / EVALUATIONS, "a")  # noqa: SIM115
        self._log_handle.write(json.dumps(row) + "\n")
        self._log_handle.flush()

    # -- the checkpoint -----------------------------------------------------------------------
    def save_checkpoint(self, pickled: bytes) -> None:
        """``pickled``: the state, pickled by the caller, so that this write can run on another thread
        while the caller goes on changing the state."""
        if self._log_handle is not None:
            os.fsync(self._log_handle.fileno())  # the log must be durable before the checkpoint counts it
        atomic_write_bytes(self.path / CHECKPOINT, pickled)

    def load_checkpoint(self) -> object | None:
        path = self.path / CHECKPOINT
        if not path.exists():
            return None
        try:
            return pickle.loads(path.read_bytes())
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as error:
            raise EvomergeError(
                f"checkpoint '{path}' cannot be read ({error})",
                "it was written by another evomerge version or damaged; start a new run",
            ) from error
