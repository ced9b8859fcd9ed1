"""The trackers as one watcher of the search (progress.py): what each event logs, and the bookkeeping that
makes a resumed run continue the same tracker runs without logging a step twice.

Every tracker logs on one axis, the evaluation index (the row of evaluations.jsonl):
- each candidate: ``candidate/<objective>`` (failed ones left out), ``candidate/seconds``, and
  ``candidate/items_scored`` where racing or the estimate scores part of the items;
- each generation: ``best/<objective>`` (the best fully scored candidate so far) and ``generation``, at the
  step of the generation's last row;
- at the start of a tracker's run, the resolved config; at the run's end, the best candidate's recipe,
  its mergekit config and model card (written into the run folder's ``best/`` too) and the plots.

``trackers.json`` in the run folder keeps each tracker's run id and the last evaluation and generation it
logged, written after each (and after the tracker flushed). A resume replays the rows logged after the
checkpoint; those a tracker already has are skipped. A kill between a tracker's write and that save leaves
the tracker a step ahead of the file: TensorBoard purges what lies past it, MLflow (and W&B online) read
their run's last step back on resume. A tracker that raises (an unreachable server, a full
disk) logs one warning and is dropped for the rest of the process: it never stops the search.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import yaml

from evomerge.io.atomic import atomic_write_text
from evomerge.materialize.model_card import card_tail, write_recipe_files
from evomerge.recipe.plain import recipe_from_plain
from evomerge.recipe.recipe import Recipe
from evomerge.search.run_folder import RunFolder
from evomerge.search.state import SearchState
from evomerge.track import tracker_class

log = logging.getLogger(__name__)

STATE_FILE = "trackers.json"
BEST_FOLDER = "best"


class Reporting:
    def __init__(self, *, names: list[str], run: RunFolder, config: dict, objectives: list[str]) -> None:
        self.names = names
        self.run = run
        self.config = config
        self.objectives = objectives
        self.trackers: dict = {}  # name -> an open tracker; one that failed is removed
        self.saved: dict[str, dict] = {}
        self.ended = False

    def start(self, state: SearchState) -> None:
        path = self.run.path / STATE_FILE
        self.saved = json.loads(path.read_text()) if path.exists() else {}
        for name in self.names:
            saved = self.saved.setdefault(name, {"evaluation": -1, "generation": -1})
            try:
                tracker = tracker_class(name)(folder=self.run.path, saved=saved)
                if saved["evaluation"] < 0 and saved["generation"] < 0:
                    tracker.log_config(self.config)
            except Exception as error:  # noqa: BLE001 - a tracker never stops the search
                self._warn(name, error)
                continue
            self.trackers[name] = tracker
        self._save()

    def candidate(self, row: dict, state: SearchState) -> None:
        values = {f"candidate/{name}": score for name, score in zip(self.objectives, row["scores"], strict=True)}
        values = {k: v for k, v in values.items() if v is not None and math.isfinite(v)}
        values["candidate/seconds"] = row["seconds"]
        if "items" in row:
            values["candidate/items_scored"] = row["items"][0]
        self._log("evaluation", row["index"], values, step=row["index"])

    def generation_done(self, state: SearchState) -> None:
        values = {"generation": state.generation - 1}
        if state.best is not None:
            values |= {f"best/{name}": score for name, score in zip(self.objectives, state.best.scores, strict=True)}
        self._log("generation", state.generation - 1, values, step=state.evaluations - 1)

    def run_ended(self, state: SearchState) -> None:
        self.ended = True
        artifacts = [self.run.config_path, *self._write_best(state)]
        artifacts += [self.run.path / name for name in ("fitness.png", "pareto.png") if (self.run.path / name).exists()]
        for name, tracker in list(self.trackers.items()):
            self._call(name, tracker.log_artifacts, artifacts)

    def close(self) -> None:
        for name, tracker in list(self.trackers.items()):
            self._call(name, tracker.close, self.ended)
        self.trackers.clear()

    def _log(self, counter: str, index: int, values: dict[str, float], *, step: int) -> None:
        logged = False
        for name, tracker in list(self.trackers.items()):
            if index <= self.saved[name][counter]:
                continue  # a row (or generation) a resume replays, which this tracker has already
            if self._call(name, tracker.log, values, step):
                self.saved[name][counter] = index
                logged = True
        if logged:
            self._save()

    def _call(self, name: str, method, *args) -> bool:
        try:
            method(*args)
        except Exception as error:  # noqa: BLE001 - a tracker never stops the search
            self._warn(name, error)
            self.trackers.pop(name, None)
            return False
        return True

    def _warn(self, name: str, error: Exception) -> None:
        log.warning("report_to %s failed (%s: %s); the search goes on without it", name, type(error).__name__, error)

    def _save(self) -> None:
        for name in self.trackers:
            self.saved[name] |= self.trackers[name].ids()
        atomic_write_text(self.run.path / STATE_FILE, json.dumps(self.saved, indent=1) + "\n")

    def _write_best(self, state: SearchState) -> list[Path]:
        """The best candidate's recipe and model card in ``best/`` (the files an export writes beside the weights)."""
        if state.best is None:
            return []
        folder = self.run.path / BEST_FOLDER
        folder.mkdir(exist_ok=True)
        scores = dict(zip(self.objectives, state.best.scores, strict=True)) | (state.best.metrics or {})
        recipe = recipe_from_plain(state.best.recipe)
        if isinstance(recipe, Recipe):
            write_recipe_files(folder=folder, recipe=recipe, scores=scores)
        else:
            recipe_yaml = yaml.safe_dump(state.best.recipe, sort_keys=False)
            atomic_write_text(folder / "evomerge_recipe.yaml", recipe_yaml)
            card = ["# Data-flow merge (best so far)", "", *card_tail(scores, recipe_yaml, None)]
            atomic_write_text(folder / "README.md", "\n".join(card))
        return sorted(folder.iterdir())
