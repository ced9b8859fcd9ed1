"""PNG plots written into the run folder: fitness per generation, and the Pareto front."""

from __future__ import annotations

from pathlib import Path

from evomerge.search.state import SearchState


def write_plots(folder: Path, state: SearchState, objectives: list[str], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    if state.history:
        fig, ax = plt.subplots(figsize=(6, 4))
        generations = [h["generation"] for h in state.history]
        ax.plot(generations, [h["best"] for h in state.history], label="best so far")
        ax.plot(generations, [h["mean"] for h in state.history], label="generation mean", alpha=0.7)
        _finish(plt, fig, ax, ("generation", objectives[0]), folder / "fitness.png")
    if len(objectives) >= 2 and state.front is not None:
        points = [r["scores"][:2] for r in rows if r["scores"] and None not in r["scores"][:2]]
        front = sorted(m.scores[:2] for m in state.front.members)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=12, alpha=0.4, label="evaluated")
        ax.plot([p[0] for p in front], [p[1] for p in front], "o-", color="C3", label="Pareto front")
        _finish(plt, fig, ax, (objectives[0], objectives[1]), folder / "pareto.png")


def _finish(plt, fig, ax, labels: tuple[str, str], path: Path) -> None:
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
