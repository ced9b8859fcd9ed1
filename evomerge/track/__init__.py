"""Experiment trackers, named as transformers' Trainer names them: ``report_to: [tensorboard, wandb, mlflow]``.

One small class per tracker (`to_tensorboard.py`, `to_wandb.py`, `to_mlflow.py`), each importing its library
only when named, as transformers' ``integrations/integration_utils.py`` does. `reporting.py` hands them the
search's events and keeps a resumed run from logging a step twice.
"""

from __future__ import annotations

import importlib
import importlib.util

from evomerge.errors import EvomergeError

# name -> (module, class, the package that provides it)
TRACKERS = {
    "tensorboard": ("evomerge.track.to_tensorboard", "TensorBoardTracker", "tensorboard"),
    "wandb": ("evomerge.track.to_wandb", "WandbTracker", "wandb"),
    "mlflow": ("evomerge.track.to_mlflow", "MlflowTracker", "mlflow"),
}


def check_report_to(names: list[str]) -> None:
    """Refuse an unknown tracker, or one whose package is missing, before the run starts."""
    for name in names:
        if name not in TRACKERS:
            raise EvomergeError(
                f"report_to names '{name}', which evomerge does not report to", f"use any of {sorted(TRACKERS)}"
            )
        package = TRACKERS[name][2]
        if importlib.util.find_spec(package) is None:
            raise EvomergeError(
                f"report_to names '{name}' but its package '{package}' is not installed",
                f"pip install 'evomerge[{name}]', or drop '{name}' from report_to",
            )


def tracker_class(name: str) -> type:
    module, cls, _ = TRACKERS[name]
    return getattr(importlib.import_module(module), cls)
