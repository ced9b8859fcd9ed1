"""A small search on the toy world's math task, as overrides of the real Hydra config."""

from __future__ import annotations

from pathlib import Path

from evomerge.toy import ToyWorld


def small_search(world: ToyWorld, run_dir: Path, *, candidates: int = 4) -> list[str]:
    """Task arithmetic of both experts on 8 items of toy_math, ``candidates`` candidates in one generation."""
    return [
        f"run_dir={run_dir}",
        f"models.base={world.base}",
        f"models.experts=[{world.experts['math']},{world.experts['lang']}]",
        f"tasks.include_path={world.tasks_dir}",
        "tasks.names=[toy_math]",
        "tasks.limit=8",
        "objectives=[{name: math, terms: {toy_math/acc: 1.0}}]",
        "method.name=task_arithmetic",
        f"optimizer.popsize={candidates}",
        f"budget.evaluations={candidates}",
    ]
