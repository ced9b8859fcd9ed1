"""TensorBoard: event files in ``RUN_DIR/tensorboard`` (``tensorboard --logdir RUN_DIR``), written by torch's
``SummaryWriter`` (the ``tensorboard`` package), as transformers' ``TensorBoardCallback`` writes them."""

from __future__ import annotations

from pathlib import Path

import yaml

LOG_FOLDER = "tensorboard"


class TensorBoardTracker:
    def __init__(self, *, folder: Path, saved: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # On a resume, events a killed process wrote past the last step trackers.json counts are purged
        # (hidden from TensorBoard's readers), so the step logged again is not there twice.
        purge_step = saved["evaluation"] + 1 if saved["evaluation"] >= 0 else None
        self.writer = SummaryWriter(log_dir=str(folder / LOG_FOLDER), purge_step=purge_step)

    def ids(self) -> dict:
        return {}

    def log_config(self, config: dict) -> None:
        self.writer.add_text("config", _code(yaml.safe_dump(config, sort_keys=False)), 0)
        self.writer.flush()

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # before trackers.json counts the step

    def log_artifacts(self, paths: list[Path]) -> None:
        from matplotlib.image import imread

        for path in paths:
            tag = f"run_end/{path.parent.name}/{path.name}" if path.parent.name == "best" else f"run_end/{path.name}"
            if path.suffix == ".png":
                self.writer.add_image(tag, imread(path)[..., :3], dataformats="HWC")
            else:
                self.writer.add_text(tag, _code(path.read_text()))
        self.writer.flush()

    def close(self, finished: bool) -> None:
        self.writer.close()


def _code(text: str) -> str:
    """TensorBoard renders text as Markdown: indented, YAML keeps its lines."""
    return "\n".join("    " + line for line in text.splitlines())
