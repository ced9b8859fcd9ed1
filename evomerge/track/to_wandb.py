"""Weights & Biases, as transformers' ``WandbCallback`` reports to it (and mergekit-evolve did).

W&B reads its own settings from the environment: ``WANDB_PROJECT`` (default here: evomerge), ``WANDB_MODE``
(offline writes the run into the run folder's ``wandb/`` for a later ``wandb sync``), ``WANDB_DIR``
(default here: the run folder). The run id is kept in trackers.json, so a resume continues the same run.

A driver killed by SIGKILL loses the rows W&B's service process had not written yet (it writes a history
row once the next step arrives, and asynchronously): trackers.json counts them as logged, so they are
missing from the W&B run, never there twice.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


class WandbTracker:
    def __init__(self, *, folder: Path, saved: dict) -> None:
        import wandb

        where = {} if os.environ.get("WANDB_DIR") else {"dir": str(folder)}
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "evomerge"),
            name=folder.name,
            id=saved.get("run_id") or uuid.uuid4().hex[:8],
            resume="allow",
            **where,
        )
        if saved.get("run_id") and self.run.step > 0:
            # Resumed online, W&B knows the run's last step, which a killed driver may have logged after its
            # last save of trackers.json (W&B would drop it again, warning; offline it starts at 0).
            saved["evaluation"] = max(saved["evaluation"], self.run.step - 1)

    def ids(self) -> dict:
        return {"run_id": self.run.id}

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_artifacts(self, paths: list[Path]) -> None:
        import wandb

        artifact = wandb.Artifact(f"evomerge-{self.run.id}", type="evomerge-run")
        for path in paths:
            artifact.add_file(str(path), name=f"{path.parent.name}/{path.name}" if path.parent.name == "best" else None)
        self.run.log_artifact(artifact)

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)
