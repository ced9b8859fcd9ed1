"""The two figures of scripts/toy_results.py, drawn from run folders alone (so they can be redrawn later):
best-so-far fitness per generation for each optimizer, random search as a band, and the Pareto front
of a two-objective run with the parents and default merges marked.
"""

from __future__ import annotations

import io
import math
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from evomerge.evaluate.lm_eval_scorer import weighted_sum
from evomerge.io.atomic import atomic_write_bytes
from evomerge.search.run_folder import RunFolder

LINES = {"ps": "PS (CMA-ES)", "dfs": "DFS (CMA-ES)", "ps_dfs": "PS+DFS (CMA-ES, after its PS run)"}
BAND = "random"


def best_per_generation(rows: list[dict]) -> tuple[list[int], list[float]]:
    """``(evaluations spent, best first-objective score so far)`` at the end of each generation."""
    spent, best_so_far, best = [], [], -math.inf
    for i, row in enumerate(rows):
        if row["scores"][0] is not None:
            best = max(best, row["scores"][0])
        if i + 1 == len(rows) or rows[i + 1]["generation"] != row["generation"]:
            spent.append(i + 1)
            best_so_far.append(best)
    return spent, best_so_far


def runs_by_name(work: Path) -> dict[str, list[Path]]:
    """The run folders ``<name>-<seed>`` under ``work``, grouped by name, seeds in order."""
    runs: dict[str, list[Path]] = {}
    for config in sorted(work.glob("*-*/config.yaml"), key=lambda p: int(p.parent.name.rpartition("-")[2])):
        runs.setdefault(config.parent.name.rpartition("-")[0], []).append(config.parent)
    return runs


def plot_fitness(runs: dict[str, list[Path]], out: Path) -> None:
    curves = {name: [best_per_generation(RunFolder(d).read_evaluations()) for d in runs[name]] for name in runs}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if BAND in curves:
        spent, lowest, mean, highest = _across_seeds(curves[BAND])
        ax.fill_between(
            spent, lowest, highest, step="post", color="0.6", alpha=0.35, label="random search (PS), min-max"
        )
        ax.step(spent, mean, where="post", color="0.35", linestyle="--", label="random search (PS), mean")
    for name, label in LINES.items():
        if name in curves:
            spent, _, mean, _ = _across_seeds(curves[name])
            ax.step(spent, mean, where="post", marker="o", markersize=3, label=label)
    seeds = max(len(c) for c in curves.values())
    objective = OmegaConf.load(next(iter(runs.values()))[0] / "config.yaml").objectives[0].name
    ax.set_title(f"Best so far, mean over {seeds} seed(s)")
    _finish(plt, fig, ax, ("evaluations spent", f"{objective} (search split)"), out)


def _across_seeds(curves: list[tuple[list[int], list[float]]]):
    """Per generation: evaluations spent, and the min, mean and max over seeds of the best so far."""
    generations = min(len(spent) for spent, _ in curves)
    columns = [[best[g] for _, best in curves] for g in range(generations)]
    return (
        curves[0][0][:generations],
        [min(c) for c in columns],
        [statistics.mean(c) for c in columns],
        [max(c) for c in columns],
    )


def plot_pareto(run_dir: Path, references: dict[str, dict[str, float]], out: Path) -> None:
    """Every evaluated candidate of a two-objective run, its front, and ``references`` (name -> metrics)."""
    objectives = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml").objectives)
    run = RunFolder(run_dir)
    points = [r["scores"][:2] for r in run.read_evaluations() if None not in r["scores"][:2]]
    front = sorted(member.scores[:2] for member in run.load_checkpoint().front.members)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5.5))
    ax.scatter(*zip(*points, strict=True), s=14, color="C0", alpha=0.2, label=f"evaluated ({len(points)})")
    ax.plot(*zip(*front, strict=True), "o-", color="C3", label="Pareto front")
    for i, (name, metrics) in enumerate(references.items()):
        x, y = (weighted_sum(metrics, o["terms"]) for o in objectives[:2])
        ax.scatter([x], [y], marker="*^sDvP"[i % 6], s=90, color=f"C{(i + 4) % 10}", edgecolor="k", label=name)
    ax.set_title(f"NSGA-II, {len(points)} evaluations")
    labels = tuple(" + ".join(o["terms"]) for o in objectives[:2])
    _finish(plt, fig, ax, labels, out)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, labels: tuple[str, str], out: Path) -> None:
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(out, png.getvalue())
