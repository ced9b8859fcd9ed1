"""``heartbeat.json``: the driver's proof of life, so `evomerge status` can tell a live run from a dead one.

A daemon thread rewrites it every ``period_s`` (and the loop at each generation), atomically, with the
driver's host and pid. A driver killed by SIGKILL stops refreshing it: the file then ages past a few
periods, and on the driver's own host its pid is gone at once. A driver that ends, normally or by an
error, writes its last state (finished or stopped) before it goes.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from evomerge.io.atomic import atomic_write_text
from evomerge.search.state import SearchState

HEARTBEAT = "heartbeat.json"
# Often enough that a dead driver shows within a minute; rare enough to cost nothing on a shared file system.
PERIOD_S = 15.0


class Heartbeat:
    def __init__(self, folder: Path, *, period_s: float = PERIOD_S) -> None:
        self.path = Path(folder) / HEARTBEAT
        self.period_s = period_s
        self._fields = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self._elapsed: tuple[float, float] | None = None  # the run's search time, and when it was that
        self._state = "running"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat_until_stopped, name="evomerge-heartbeat", daemon=True)
        self.write()
        self._thread.start()

    def write(self) -> None:
        with self._lock:
            now = time.time()
            elapsed = None if self._elapsed is None else self._elapsed[0] + now - self._elapsed[1]
            beat = {**self._fields, "time": now, "period_s": self.period_s, "state": self._state}
            atomic_write_text(self.path, json.dumps(beat | {"elapsed_s": elapsed}) + "\n")

    # The search's events (see progress.py): the search time is known once the loop has resumed.
    def start(self, state: SearchState) -> None:
        self._elapsed = (state.elapsed_s, time.time())
        self.write()

    def candidate(self, row: dict, state: SearchState) -> None:
        pass

    def generation_done(self, state: SearchState) -> None:
        self.start(state)

    def run_ended(self, state: SearchState) -> None:
        self._state = "finished"

    def close(self) -> None:
        """Stop beating; the last beat says finished (after ``run_ended``) or stopped (an error)."""
        self._stop.set()
        self._thread.join()
        if self._state == "running":
            self._state = "stopped"
        self.write()

    def _beat_until_stopped(self) -> None:
        while not self._stop.wait(self.period_s):
            self.write()


def read_heartbeat(folder: Path) -> dict | None:
    path = Path(folder) / HEARTBEAT
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def driver_alive(beat: dict, now: float) -> tuple[bool, str]:
    """Whether the driver that wrote ``beat`` is alive, and why it is judged so."""
    age = now - beat["time"]
    if beat["state"] != "running":
        return False, f"{beat['state']} {age:.0f} s ago"
    if beat["host"] == socket.gethostname() and not _pid_alive(beat["pid"]):
        return False, f"killed: pid {beat['pid']} is gone (last heartbeat {age:.0f} s ago)"
    # Three periods: a driver busy on a slow disk may write one beat late, not three.
    if age > 3 * beat["period_s"]:
        return False, f"no heartbeat for {age:.0f} s (every {beat['period_s']:.0f} s expected): killed or hung"
    return True, f"heartbeat {age:.0f} s ago"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    return True
