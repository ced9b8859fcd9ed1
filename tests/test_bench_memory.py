"""scripts/bench_memory.py: its memory probe wraps ``Worker.evaluate`` as the executors call it."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from evomerge.executor.serial import SerialExecutor
from evomerge.executor.worker import Worker

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_the_probe_takes_the_executors_arguments_and_reads_memory_after_each_candidate(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.delitem(sys.modules, "bench_memory", raising=False)
    bench_memory = importlib.import_module("bench_memory")
    seen = []
    monkeypatch.setattr(Worker, "evaluate", lambda self, recipe, subset=None: seen.append((recipe, subset)) or recipe)
    executor = SerialExecutor.__new__(SerialExecutor)  # no worker to build: its evaluate is the stand-in above
    executor.worker = Worker.__new__(Worker)

    def search(cfg, work):  # the session's search, reduced to the serial executor's calls
        assert list(executor.evaluate(["a", "b"])) == [(0, "a"), (1, "b")]
        assert list(executor.evaluate(["c"], subset="items")) == [(0, "c")]

    monkeypatch.setattr(bench_memory, "start", search)
    bench_memory.register_configs()  # as its main() does before composing
    readings = bench_memory.run_search(["preset=toy", "executor=serial"], tmp_path, "cpu")
    assert seen == [("a", None), ("b", None), ("c", "items")]
    assert len(readings) == 3 and set(readings[0]) == {"rss", "objects"}
