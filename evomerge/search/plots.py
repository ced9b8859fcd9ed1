"""PNG plots in the run folder, rewritten after every generation: fitness per generation, the Pareto front.

Each is drawn off-screen (a matplotlib Figure, no pyplot: no display, no global state) and written to a
temporary name renamed into place, so a person refreshing the picture never sees half a file.
Drawing costs about 0.5 s (a loaded 2-core CPU, a thousand rows): where generations come faster than
that matters (the toy world's take a second), a generation's rewrite is skipped until 20 drawing times
have passed since the last, so the plots never take more than 5% of the run; the run's end always draws.
Partial scores (a candidate racing stopped early, or the estimate scored on anchor items only) are drawn
apart, as grey crosses: they are estimates, never in the best-so-far line (loop.py keeps them out of the best).
"""

from __future__ import annotations

import io
import time
from pathlib import Path

from evomerge.io.atomic import atomic_write_bytes
from evomerge.search.run_folder import RunFolder
from evomerge.search.state import SearchState
from evomerge.search.status import partial


class Plots:
    """The search's plots as a watcher (progress.py): written after each generation, from the log's rows."""

    def __init__(self, run: RunFolder, objectives: list[str]) -> None:
        self.run = run
        self.objectives = objectives
        self.rows: list[dict] | None = None  # read from the log at the first generation, then kept up to date
        self._next_s = 0.0  # time.monotonic() from which the next generation draws
        self._drawn = 0  # generations the plots show

    def start(self, state: SearchState) -> None:
        pass

    def candidate(self, row: dict, state: SearchState) -> None:
        if self.rows is not None:
            self.rows.append(row)

    def generation_done(self, state: SearchState) -> None:
        if self.rows is None:
            self.rows = self.run.read_evaluations()  # after the resume truncated it: each row once
        if time.monotonic() >= self._next_s:
            self._draw(state)

    def run_ended(self, state: SearchState) -> None:
        if self.rows is not None and self._drawn < len(state.history):
            self._draw(state)

    def _draw(self, state: SearchState) -> None:
        started = time.monotonic()
        write_plots(self.run.path, state, self.objectives, self.rows)
        self._next_s = started + 20 * (time.monotonic() - started)
        self._drawn = len(state.history)

    def close(self) -> None:
        pass


def write_plots(folder: Path, state: SearchState, objectives: list[str], rows: list[dict]) -> None:
    from matplotlib.figure import Figure

    scored = [r for r in rows if r["scores"] and None not in r["scores"]]
    full = [r for r in scored if not partial(r)]
    estimated = [r for r in scored if partial(r)]
    if state.history:
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        generations = [h["generation"] for h in state.history]
        ax.scatter([r["generation"] for r in full], [r["scores"][0] for r in full], s=8, alpha=0.3, label="candidate")
        if estimated:
            points = ([r["generation"] for r in estimated], [r["scores"][0] for r in estimated])
            ax.scatter(*points, s=12, marker="x", color="0.6", label="partial (stopped early or estimated)")
        ax.plot(generations, [h["best"] for h in state.history], color="C3", label="best so far (fully scored)")
        ax.plot(generations, [h["mean"] for h in state.history], color="C1", alpha=0.7, label="generation mean")
        _finish(fig, ax, ("generation", objectives[0]), folder / "fitness.png")
    if len(objectives) >= 2 and state.front is not None:
        front = sorted(m.scores[:2] for m in state.front.members)
        fig = Figure(figsize=(5, 5))
        ax = fig.subplots()
        ax.scatter([r["scores"][0] for r in full], [r["scores"][1] for r in full], s=12, alpha=0.4, label="evaluated")
        if estimated:
            points = ([r["scores"][0] for r in estimated], [r["scores"][1] for r in estimated])
            ax.scatter(*points, s=12, marker="x", color="0.6", label="partial (stopped early or estimated)")
        ax.plot([p[0] for p in front], [p[1] for p in front], "o-", color="C3", label="Pareto front")
        _finish(fig, ax, (objectives[0], objectives[1]), folder / "pareto.png")


def _finish(fig, ax, labels: tuple[str, str], path: Path) -> None:
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    atomic_write_bytes(path, png.getvalue())
