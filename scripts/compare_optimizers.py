"""CMA-ES against random search (and any other optimizer) at the same budget on the toy world.

    python scripts/compare_optimizers.py --seeds 1 2 3 --optimizers cmaes random -- budget.evaluations=96

Writes results/search_toy.md: best fitness per optimizer (mean ± std over seeds), the best run's metrics,
time per evaluation and the share of search wall time spent outside scoring candidates.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

from toy_comparison import search

from evomerge.config import register_configs
from evomerge.io.atomic import atomic_write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--optimizers", nargs="+", default=["cmaes", "random"])
    parser.add_argument("--generation-size", type=int, default=8, help="candidates per generation, for every optimizer")
    parser.add_argument("--work", type=Path, default=Path("/tmp/evomerge-compare"))
    parser.add_argument("--out", type=Path, default=Path("results/search_toy.md"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides shared by every run")
    args = parser.parse_args()

    register_configs()
    shutil.rmtree(args.work, ignore_errors=True)
    results: dict[str, list] = {name: [] for name in args.optimizers}
    for name in args.optimizers:
        for seed in args.seeds:
            run = search(args.work, name, seed, name, args.generation_size, args.overrides)
            results[name].append((seed, run["state"], run["wall"]))

    cfg = run["config"]
    objective = cfg.objectives[0].name
    lines = [
        "# Toy-world search: optimizers at equal budget",
        "",
        f"Command: `python {' '.join(sys.argv)}` (toy world `{Path(cfg.models.base).parents[1].name}`)",
        "",
        f"Objective: `{objective}` = "
        + " + ".join(f"{w} × {k}" for k, w in cfg.objectives[0].terms.items())
        + f"; method `{cfg.method.name}`; budget {cfg.budget.evaluations} evaluations in generations of "
        + f"{args.generation_size}; seeds {args.seeds}.",
        "",
        "| optimizer | best fitness (mean ± std) | per seed | evaluations | s / evaluation | outside scoring |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, runs in results.items():
        bests = [state.best.scores[0] for _, state, _ in runs]
        evaluations = sum(state.evaluations for _, state, _ in runs)
        scoring = sum(state.evaluating_s for _, state, _ in runs)
        distinct = sum(len(state.cache) for _, state, _ in runs)
        elapsed = sum(state.elapsed_s for _, state, _ in runs)
        spread = statistics.stdev(bests) if len(bests) > 1 else 0.0
        lines.append(
            f"| {name} | {statistics.mean(bests):.4f} ± {spread:.4f} | {', '.join(f'{b:.4f}' for b in bests)} "
            f"| {evaluations // len(runs)} | {scoring / max(distinct, 1):.3f} | {100 * (1 - scoring / elapsed):.1f}% |"
        )
    lines += ["", "Best candidate of each run (all metrics):", ""]
    for name, runs in results.items():
        for seed, state, wall in runs:
            metrics = ", ".join(f"{k} {v:.3f}" for k, v in sorted(state.best.metrics.items()))
            lines.append(f"- {name}, seed {seed} ({wall:.0f} s incl. start-up): {metrics}")
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
