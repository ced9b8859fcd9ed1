"""The README's demo: build the toy world (cached), search task-arithmetic merges of its two experts,
export the best, and put the parents' scores beside the winner's."""

from __future__ import annotations

import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from evomerge.config import CONF_DIR, register_configs
from evomerge.executor.worker import Worker, WorkerSpec
from evomerge.export import export_run
from evomerge.recipe.recipe import Recipe
from evomerge.search.session import start, task_set


def run_demo(*, out_dir: Path = Path("demo"), overrides: list[str] | None = None) -> None:
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["preset=toy", *(overrides or [])])
    run_dir = out_dir / time.strftime("run-%Y%m%d-%H%M%S")
    started = time.perf_counter()
    state = start(cfg, run_dir)
    (best,) = export_run(run_dir, out_dir / "best", overwrite=True)

    # The parents are task-arithmetic merges too: weight 1 on one expert and 0 on the other is that
    # expert exactly, and 0 on both is the base; weight 1 on both is the merge one would make by hand.
    # Scoring them with the same worker keeps it comparable.
    experts = list(cfg.models.experts)
    names = ["math expert", "lang expert"]
    worker = Worker(WorkerSpec(template=Recipe.from_plain(state.best.recipe), tasks=task_set(cfg)))
    rows = []
    references = [("base", (0.0, 0.0)), (names[0], (1.0, 0.0)), (names[1], (0.0, 1.0)), ("default merge", (1.0, 1.0))]
    for label, weights in references:
        recipe = Recipe.from_plain(
            {
                "method": "task_arithmetic",
                "base": cfg.models.base,
                "models": [{"model": m, "weight": w} for m, w in zip(experts, weights, strict=True)],
                "dtype": "float32",
            }
        )
        rows.append((label, worker.evaluate(recipe).metrics))
    rows.append(("best merge (searched)", state.best.metrics))
    tasks = sorted({k for _, metrics in rows for k in metrics})
    print("\n| model | " + " | ".join(tasks) + " |")
    print("| --- |" + " --- |" * len(tasks))
    for label, metrics in rows:
        print(f"| {label} | " + " | ".join(f"{metrics[k]:.3f}" for k in tasks) + " |")
    print(f"\nrun folder: {run_dir} (evaluations.jsonl, fitness.png); best model: {best}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
