"""`evomerge status` on a live, a finished and a killed run, read from the run folder alone; the heartbeat;
the per-candidate log line; each worker's name and memory-tier line in the rows and workers.jsonl."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from matplotlib.image import imread

from evomerge.cli import main
from evomerge.config import CONF_DIR, register_configs
from evomerge.executor.worker import Outcome
from evomerge.search.heartbeat import HEARTBEAT, Heartbeat
from evomerge.search.loop import Budget, run_search
from evomerge.search.plots import Plots
from evomerge.search.run_folder import RunFolder
from evomerge.search.session import start
from evomerge.search.status import WORKERS, read_status
from tests.test_search_loop import OBJECTIVES, fitness, genome
from tests.toy_config import small_search

REPO = Path(__file__).resolve().parents[1]


class Scripted:
    """The known fitness, with a twist per call: calls 4 and 7 fail, every third is a partial score (a race
    stopped it after 2 of 4 items) 10 above the rest, workers w0 and w1 alternate at 0.5 s a candidate.
    ``hold`` (an Event) stops it before call ``hold_at`` until set."""

    def __init__(self, *, hold: threading.Event | None = None, hold_at: int = 0) -> None:
        self.calls = 0
        self.hold, self.hold_at = hold, hold_at

    def __call__(self, recipes):
        for position, recipe in enumerate(recipes):
            if self.hold is not None and self.calls == self.hold_at:
                self.hold.wait(timeout=60)
            self.calls += 1
            worker = f"w{self.calls % 2}"
            if self.calls in (4, 7):
                outcome = Outcome(
                    metrics=None, error="ValueError: bad knob\n  at merge.py:1", seconds=0.5, worker=worker
                )
            elif self.calls % 3 == 0:
                value = fitness(recipe) + 10
                outcome = Outcome({"toy/acc": value}, None, 0.5, item_values=[value] * 2, items_total=4, worker=worker)
            else:
                outcome = Outcome(metrics={"toy/acc": fitness(recipe)}, error=None, seconds=0.5, worker=worker)
            yield position, outcome


def search(path: Path, evaluator, *, evaluations: int = 16, period_s: float = 0.2) -> None:
    from evomerge.optimizer.random_search import RandomSearchOptimizer

    run = RunFolder(path)
    run.lock()
    plain = {"objectives": OBJECTIVES, "budget": {"evaluations": evaluations, "wall_time_s": None}}
    run.write_config(yaml.safe_dump(plain))
    heartbeat = Heartbeat(path, period_s=period_s)
    try:
        g = genome()
        run_search(
            run=run,
            genome=g,
            optimizer=RandomSearchOptimizer(space=g.space, n_objectives=1, seed=0, batch_size=4),
            evaluate=evaluator,
            objectives=OBJECTIVES,
            budget=Budget(evaluations=evaluations),
            watchers=[heartbeat, Plots(run, ["fit"])],
        )
    finally:
        heartbeat.close()
        run.close()


def wait_for_rows(path: Path, count: int) -> None:
    deadline = time.time() + 60
    while len(RunFolder(path).read_evaluations()) < count and time.time() < deadline:
        time.sleep(0.02)


def test_status_of_a_live_then_finished_run(tmp_path, capsys, monkeypatch):
    hold = threading.Event()
    driver = threading.Thread(target=search, args=(tmp_path, Scripted(hold=hold, hold_at=10)))
    driver.start()
    try:
        wait_for_rows(tmp_path, 8)  # generations of 4: 8 logged, the third generation waits at its 3rd call
        live = read_status(tmp_path)
        drawn_live = (tmp_path / "fitness.png").exists()  # by the first generation, not only at the end
    finally:
        hold.set()
        driver.join()
    rows = RunFolder(tmp_path).read_evaluations()
    assert live["alive"] and live["driver"]["state"] == "running" and "heartbeat" in live["driver"]["why"]
    assert live["evaluations"] in (8, 9, 10) and live["budget"]["evaluations"] == 16
    assert live["eta_s"] is not None and live["eta_s"] > 0
    assert drawn_live and imread(tmp_path / "fitness.png").shape[2] == 4
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []  # renamed into place

    capsys.readouterr()  # the search's summary
    assert main(["status", str(tmp_path), "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert not done["alive"] and done["driver"]["state"] == "finished" and done["eta_s"] is None
    assert done["evaluations"] == 16 and done["generations"] == 4
    assert done["checkpointed"] == {"evaluations": 16, "generations": 4}
    # Best: fully scored only. Calls 3, 6, 9, ... are partial and 10 higher; calls 4 and 7 failed.
    full = [r for r in rows if r["error"] is None and "items" not in r]
    assert len(full) == 16 - 5 - 2
    best = max(full, key=lambda r: r["scores"][0])
    assert done["best"]["index"] == best["index"] and done["best"]["scores"] == {"fit": best["scores"][0]}
    assert done["best"]["recipe"].startswith("ties; m1: ")
    assert done["items"] == {"scored": 5 * 2, "total": 5 * 4, "candidates": 5, "partial": 5}
    assert done["failures"] == [{"error": "ValueError: bad knob", "count": 2}]
    # Two workers, 8 candidates each at 0.5 s: 4 s busy, 7,200 an hour while scoring.
    assert [(w["worker"], w["candidates"], w["busy_s"], w["per_hour_busy"]) for w in done["workers"]] == [
        ("w1", 8, 4.0, 7200.0),
        ("w0", 8, 4.0, 7200.0),
    ]
    assert done["candidates_per_hour"] == 3600 * 16 / done["elapsed_s"]

    assert main(["status", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "not alive" in text and "finished" in text and "evaluations 16 of 16 (100%)" in text
    assert f"best so far (fully scored): #{best['index']}" in text and "2 x ValueError: bad knob" in text

    naps = []

    def nap(seconds):  # the second wait is ended by Ctrl-C
        naps.append(seconds)
        if len(naps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr("evomerge.cli.time.sleep", nap)
    assert main(["status", str(tmp_path), "--json", "--watch", "30"]) == 0
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert naps == [30, 30] and [r["best"] for r in reports] == [done["best"]] * 2


KILLED_DRIVER = textwrap.dedent(
    """
    import sys, time
    from tests.test_status import Scripted, search

    class Slow(Scripted):
        def __call__(self, recipes):
            for item in super().__call__(recipes):
                time.sleep(0.05)
                yield item

    search(sys.argv[1], Slow(), evaluations=400, period_s=30)
    """
)


@pytest.mark.e2e  # a driver process to kill: ~10 s, most of it importing torch
def test_a_killed_run_shows_as_not_alive(tmp_path):
    driver = subprocess.Popen([sys.executable, "-c", KILLED_DRIVER, str(tmp_path)], cwd=REPO)
    wait_for_rows(tmp_path, 3)
    assert read_status(tmp_path)["alive"]
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    killed = read_status(tmp_path)
    assert not killed["alive"] and f"pid {driver.pid} is gone" in killed["driver"]["why"]
    assert killed["driver"]["state"] == "running"  # the last beat before the kill; the pid tells
    # Seen from another node: the pid cannot be checked, the heartbeat's age tells.
    beat = json.loads((tmp_path / HEARTBEAT).read_text())
    (tmp_path / HEARTBEAT).write_text(json.dumps(beat | {"host": "another-node"}))
    assert read_status(tmp_path, now=beat["time"] + 60)["alive"]
    late = read_status(tmp_path, now=beat["time"] + 91)  # more than three periods of 30 s
    assert not late["alive"] and "no heartbeat for 91 s" in late["driver"]["why"]


def test_each_candidate_logs_a_line_and_names_its_worker(toy_world, tmp_path, caplog):
    register_configs()
    overrides = small_search(toy_world, tmp_path)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with caplog.at_level(logging.INFO, logger="evomerge.search"):
        start(cfg, tmp_path)
    rows = RunFolder(tmp_path).read_evaluations()
    (started,) = [json.loads(line) for line in (tmp_path / WORKERS).read_text().splitlines()]
    assert {row["worker"] for row in rows} == {started["worker"]}
    assert started["memory"].startswith("memory tier ")
    lines = [r.getMessage() for r in caplog.records if r.name == "evomerge.search"]
    assert len(lines) == 4 and lines[0].startswith("#0 key ")
    assert f"math={rows[0]['scores'][0]:.4f} {rows[0]['seconds']:.2f} s worker {started['worker']}" in lines[0]
    status = read_status(tmp_path)
    assert status["workers"][0]["memory"] == started["memory"] and status["workers"][0]["candidates"] == 4


def test_the_pareto_plot_takes_partial_and_failed_rows_and_leaves_no_temporary_file(tmp_path):
    from evomerge.optimizer.pareto import ParetoFront
    from evomerge.search.plots import write_plots
    from evomerge.search.state import SearchState

    rows = [
        {"generation": 0, "scores": [0.2, 0.8]},
        {"generation": 0, "scores": [0.6, 0.4]},
        {"generation": 0, "scores": [0.9, 0.9], "items": [2, 4]},  # a partial estimate: not on the front
        {"generation": 0, "scores": [None, None]},  # failed: not drawn
    ]
    front = ParetoFront(n_objectives=2)
    for i, row in enumerate(rows[:2]):
        front.add(id=i, scores=row["scores"])
    state = SearchState(optimizer={}, front=front, history=[{"generation": 0, "best": 0.6, "mean": 0.4}])
    write_plots(tmp_path, state, ["a", "b"], rows)
    assert imread(tmp_path / "pareto.png").shape[2] == 4 and imread(tmp_path / "fitness.png").shape[2] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fitness.png", "pareto.png"]
