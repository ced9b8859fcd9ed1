"""report_to: TensorBoard, W&B (offline) and MLflow (a local file store), each read back with its own
reader; a killed and resumed run continues the same tracker runs without a step logged twice; a tracker
that fails warns once and the search goes on."""

from __future__ import annotations

import json
import logging
import struct
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from evomerge.config import CONF_DIR, register_configs
from evomerge.errors import EvomergeError
from evomerge.optimizer.cmaes import CMAESOptimizer
from evomerge.search.loop import Budget, run_search
from evomerge.search.run_folder import RunFolder
from evomerge.search.session import start
from evomerge.track import check_report_to
from evomerge.track.reporting import STATE_FILE, Reporting
from evomerge.track.to_tensorboard import TensorBoardTracker
from tests.test_search_loop import OBJECTIVES, CountingEvaluator, genome
from tests.toy_config import small_search

CONFIG = {"seed": 3, "objectives": OBJECTIVES, "budget": {"evaluations": 48, "wall_time_s": None}}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline into tmp, MLflow into a file store in tmp: nothing leaves the machine."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    (tmp_path / "wandb_dir").mkdir()
    return tmp_path


def search(path: Path, evaluator, names: list[str]) -> None:
    """The loop with the trackers watching, closed as the session closes them (after an error too)."""
    g = genome()
    run = RunFolder(path)
    run.lock()
    run.write_config(yaml.safe_dump(CONFIG))
    reporting = Reporting(names=names, run=run, config=CONFIG, objectives=["fit"])
    try:
        run_search(
            run=run,
            genome=g,
            optimizer=CMAESOptimizer(space=g.space, n_objectives=1, seed=3, popsize=8),
            evaluate=evaluator,
            objectives=OBJECTIVES,
            budget=Budget(evaluations=48),
            watchers=[reporting],
        )
    finally:
        reporting.close()
        run.close()


def wandb_records(path: Path):
    """The records of a .wandb file (W&B ships no public reader since its Python store moved to wandb-core).
    The format is LevelDB's log: a 7-byte header (':W&B', magic 0xBEE1, version 0), then 32 KiB blocks of
    chunks, each with a 7-byte header (CRC32C, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, chunks = 7, []
    while position + 7 <= len(data):
        room = 32768 - position % 32768
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if room < 7 or kind == 0:  # a block's zero-filled tail
            position += room
            continue
        chunks.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def wandb_history(wandb_dir: Path, run_id: str) -> list[dict]:
    """Every history row of the run, across its offline run folders (one per process that drove it)."""
    rows = []
    for path in sorted(wandb_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    return rows


@pytest.mark.e2e
def test_a_killed_and_resumed_run_logs_each_step_once_in_every_tracker(offline, caplog):
    from mlflow import MlflowClient

    run_dir = offline / "run"
    with pytest.raises(KeyboardInterrupt):
        search(run_dir, CountingEvaluator(crash_after=13), ["tensorboard", "wandb", "mlflow"])
    assert [r.getMessage() for r in caplog.records if r.name == "evomerge.track.reporting"] == []  # none dropped
    saved = json.loads((run_dir / STATE_FILE).read_text())
    assert saved["mlflow"]["evaluation"] == 12 and saved["tensorboard"]["generation"] == 0
    search(run_dir, CountingEvaluator(), ["tensorboard", "wandb", "mlflow"])  # replays rows 8..12
    assert [r.getMessage() for r in caplog.records if r.name == "evomerge.track.reporting"] == []
    rows = RunFolder(run_dir).read_evaluations()
    scores = [row["scores"][0] for row in rows]
    best_steps = [7, 15, 23, 31, 39, 47]  # each generation's last row
    best = [max(scores[: step + 1]) for step in best_steps]

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    candidates = events.Scalars("candidate/fit")
    assert [e.step for e in candidates] == list(range(48))
    assert [e.value for e in candidates] == pytest.approx(scores, rel=1e-6)  # stored as float32
    assert [e.step for e in events.Scalars("best/fit")] == best_steps
    assert [e.value for e in events.Scalars("best/fit")] == pytest.approx(best, rel=1e-6)
    assert "run_end/best/README.md/text_summary" in events.Tags()["tensors"]  # TensorBoard names text so

    history = wandb_history(offline / "wandb_dir", saved["wandb"]["run_id"])
    steps = [row["_step"] for row in history]
    assert sorted(steps) == list(range(48)) and len(set(steps)) == 48
    by_step = {row["_step"]: row for row in history}
    assert [by_step[step]["candidate/fit"] for step in range(48)] == scores
    assert [by_step[step]["best/fit"] for step in best_steps] == best
    assert Counter("best/fit" in row for row in history)[True] == 6

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("evomerge").experiment_id])
    assert run.info.run_id == saved["mlflow"]["run_id"] and run.info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "candidate/fit"))
    assert history == list(enumerate(scores))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "best/fit")] == best_steps
    assert run.data.params["budget.evaluations"] == "48"
    best_files = {a.path for a in client.list_artifacts(run.info.run_id, "best")}
    assert {"best/evomerge_recipe.yaml", "best/README.md"} <= best_files
    recipe = yaml.safe_load((run_dir / "best" / "evomerge_recipe.yaml").read_text())
    assert recipe == RunFolder(run_dir).load_checkpoint().best.recipe


def test_a_failing_tracker_warns_once_and_the_search_goes_on(tmp_path, monkeypatch, caplog):
    calls = []

    def flaky(self, values, step):
        calls.append(step)
        if len(calls) == 5:
            raise OSError("No space left on device")
        original(self, values, step)

    original = TensorBoardTracker.log
    monkeypatch.setattr(TensorBoardTracker, "log", flaky)
    with caplog.at_level(logging.WARNING):
        search(tmp_path, CountingEvaluator(), ["tensorboard"])
    assert len(RunFolder(tmp_path).read_evaluations()) == 48
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "report_to tensorboard failed (OSError: No space left on device); the search goes on without it"
    ]
    assert calls == [0, 1, 2, 3, 4]  # dropped after its failure
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("candidate/fit")] == [0, 1, 2, 3]


def test_an_unreachable_tracker_warns_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: nothing answers
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with caplog.at_level(logging.WARNING):
        search(tmp_path, CountingEvaluator(), ["mlflow"])
    assert len(RunFolder(tmp_path).read_evaluations()) == 48
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("report_to mlflow failed (")


def test_report_to_names_the_trackers_it_knows():
    with pytest.raises(EvomergeError, match="report_to names 'comet'.*use any of"):
        check_report_to(["tensorboard", "comet"])


def test_report_to_reaches_the_trackers_from_the_config(toy_world, tmp_path):
    register_configs()
    overrides = [*small_search(toy_world, tmp_path), "report_to=[tensorboard]"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    state = start(cfg, tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("candidate/math")] == [0, 1, 2, 3]
    assert [e.value for e in events.Scalars("best/math")] == pytest.approx([state.best.scores[0]])
    assert "config/text_summary" in events.Tags()["tensors"] and "run_end/fitness.png" in events.Tags()["images"]
    assert "## Recipe (evomerge)" in (tmp_path / "best" / "README.md").read_text()


def test_a_step_logged_after_the_last_save_is_not_logged_twice(offline, monkeypatch):
    """A kill between a tracker's write and the save of trackers.json: the file counts one step fewer than
    the tracker holds, and the resumed run replays that step. TensorBoard purges its copy of it; MLflow's
    run says what it holds."""
    from mlflow import MlflowClient

    tmp_path = offline / "run"
    save = Reporting._save

    def save_unless_step_12(self):
        if self.saved["tensorboard"]["evaluation"] != 12:
            save(self)

    with monkeypatch.context() as patch:
        patch.setattr(Reporting, "_save", save_unless_step_12)
        with pytest.raises(KeyboardInterrupt):
            search(tmp_path, CountingEvaluator(crash_after=13), ["tensorboard", "mlflow"])
    saved = json.loads((tmp_path / STATE_FILE).read_text())
    assert saved["tensorboard"]["evaluation"] == saved["mlflow"]["evaluation"] == 11
    search(tmp_path, CountingEvaluator(), ["tensorboard", "mlflow"])
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("candidate/fit")] == list(range(48))
    history = MlflowClient().get_metric_history(saved["mlflow"]["run_id"], "candidate/fit")
    assert sorted(m.step for m in history) == list(range(48))
