"""MLflow, as transformers' ``MLflowCallback`` reports to it, through ``MlflowClient`` (no global active run).

MLflow reads ``MLFLOW_TRACKING_URI`` itself (a server, ``sqlite:///mlflow.db``, or a file store); the
experiment is ``MLFLOW_EXPERIMENT_NAME`` (default here: evomerge). The run id is kept in trackers.json,
so a resume continues the same run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import yaml

# MLflow's limits: 100 params per batch, and a param's value at most 6,000 characters.
PARAMS_PER_BATCH = 100
MAX_PARAM_CHARS = 6000


class MlflowTracker:
    def __init__(self, *, folder: Path, saved: dict) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient()
        if saved.get("run_id"):
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            # A killed driver may have logged a step after its last save of trackers.json: what the run
            # holds is the truth (every candidate logs its seconds, every generation its number).
            seconds = self.client.get_metric_history(self.run_id, "candidate/seconds")
            generations = self.client.get_metric_history(self.run_id, "generation")
            saved["evaluation"] = max([saved["evaluation"], *(m.step for m in seconds)])
            saved["generation"] = max([saved["generation"], *(int(m.value) for m in generations)])
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "evomerge")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=folder.name).info.run_id

    def ids(self) -> dict:
        return {"run_id": self.run_id}

    def log_config(self, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in _flat(config).items() if len(str(v)) <= MAX_PARAM_CHARS]
        for start in range(0, len(params), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + PARAMS_PER_BATCH])
        self.client.log_text(self.run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def log_artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            self.client.log_artifact(
                self.run_id, str(path), artifact_path="best" if path.parent.name == "best" else None
            )

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "FAILED")


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out
