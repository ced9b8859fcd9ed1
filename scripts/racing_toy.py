"""Paired racing against scoring every item, CMA-ES on the toy world, per seed: the items each search
scored and its best's held-out score (the exported model scored on toy_combined_holdout).

    python scripts/racing_toy.py --seeds 0 1 2 -- budget.evaluations=64

Writes results/racing_toy.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from toy_comparison import score_model, search

from evomerge.config import register_configs
from evomerge.evaluate.lm_eval_scorer import TaskSet
from evomerge.export import export_run
from evomerge.search.run_folder import RunFolder
from evomerge.toy import build_world


def items_scored(run_dir: Path, total: int) -> int:
    """Items the search scored: a raced row says how many, any other fresh row scored all ``total``."""
    rows = RunFolder(run_dir).read_evaluations()
    return sum(row["items"][0] if "items" in row else total for row in rows if not row["cached"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=Path("/tmp/evomerge-racing"))
    parser.add_argument("--out", type=Path, default=Path("results/racing_toy.md"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides shared by every run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    register_configs()
    shutil.rmtree(args.work, ignore_errors=True)
    world = build_world(size="full", seed=0)
    holdout = TaskSet(names=(world.holdout_tasks["combined"],), include_path=str(world.tasks_dir))
    total = sum(1 for _ in (world.tasks_dir / world.tasks["combined"] / "test.jsonl").open())
    lines = [
        "# Paired racing on the toy world",
        "",
        f"Command: `python {' '.join(sys.argv)}` (full toy world, seed 0; CMA-ES, generations of 8, "
        f"objective toy_combined/acc over {total} items; racing: rounds of 16, 32, 64 items, delta 0.05).",
        "",
        "| seed | scoring | items scored | best (search) | best (holdout) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for seed in args.seeds:
        for name, extra in [("every item", []), ("racing", ["racing.enabled=true"])]:
            run = search(args.work, name.replace(" ", "-"), seed, "cmaes", 8, [*extra, *args.overrides])
            (folder,) = export_run(run["run_dir"], args.work / "export" / f"{name}-{seed}".replace(" ", "-"))
            held = score_model(folder, holdout)[f"{world.holdout_tasks['combined']}/acc"]
            best = run["state"].best.scores[0]
            lines.append(f"| {seed} | {name} | {items_scored(run['run_dir'], total)} | {best:.4f} | {held:.4f} |")
            print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
