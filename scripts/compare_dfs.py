"""PS, DFS and PS+DFS searches on the toy world, CMA-ES against a structured optuna sampler for DFS,
and every best scored beside the parents, on the search tasks and on their held-out twins.

    python scripts/compare_dfs.py --seeds 1 2 -- budget.evaluations=96

Per seed: a PS search (task arithmetic, CMA-ES); DFS searches through base, math and lang with the
language expert's embeddings (the only ones that read L2), once with CMA-ES (the paper's method:
indicators continuous, thresholded at 0.5) and once with each structured optimizer (indicators
categorical, scales continuous); and a PS+DFS search (CMA-ES) whose extra source is that seed's PS best.
Each best is exported with `export_run` and reloaded, so the held-out scores are the exported model's.
Writes results/dfs_toy.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.config import CONF_DIR, register_configs
from evomerge.evaluate.lm_eval_scorer import LMEvalScorer, TaskSet
from evomerge.export import export_run
from evomerge.io.atomic import atomic_write_text
from evomerge.materialize.dataflow_to_disk import write_dataflow_model
from evomerge.recipe.dataflow import DataFlowRecipe, PathStep
from evomerge.search.run_folder import RunFolder
from evomerge.search.session import start
from evomerge.toy import build_world

GENERATION_KEY = {"cmaes": "popsize", "tpe": "batch_size", "nsga2": "population_size"}
DFS = ["genome=dfs", "genome.embedding_source=2"]  # sources default to base, math, lang


def search(work: Path, name: str, seed: int, optimizer: str, generation: int, extra: list[str]) -> dict:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "preset=toy",
                f"optimizer={optimizer}",
                f"optimizer.{GENERATION_KEY[optimizer]}={generation}",
                f"seed={seed}",
                *extra,
            ],
        )
    run_dir = work / f"{name}-{seed}"
    began = time.perf_counter()
    state = start(cfg, run_dir)
    rows = RunFolder(run_dir).read_evaluations()
    return {
        "name": name,
        "seed": seed,
        "run_dir": run_dir,
        "state": state,
        "wall": time.perf_counter() - began,
        "invalid": sum(row["error"] is not None for row in rows),
        "path": len(state.best.recipe["path"]) if "path" in state.best.recipe else None,
    }


def score_model(folder: Path, tasks: TaskSet) -> dict[str, float]:
    remote = (folder / "modeling_dataflow.py").exists()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=remote)
    return LMEvalScorer(
        model=model, tokenizer=AutoTokenizer.from_pretrained(folder, trust_remote_code=remote), tasks=tasks
    ).score()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--structured", nargs="+", default=["tpe"], help="optuna samplers to compare with CMA-ES")
    parser.add_argument("--generation-size", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("/tmp/evomerge-dfs"))
    parser.add_argument("--out", type=Path, default=Path("results/dfs_toy.md"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides shared by every run")
    args = parser.parse_args()
    torch.set_num_threads(1)

    register_configs()
    shutil.rmtree(args.work, ignore_errors=True)
    size = args.generation_size
    runs = []
    for seed in args.seeds:
        ps = search(args.work, "ps", seed, "cmaes", size, args.overrides)
        runs.append(ps)
        runs.append(search(args.work, "dfs-cmaes", seed, "cmaes", size, [*DFS, *args.overrides]))
        for sampler in args.structured:
            runs.append(search(args.work, f"dfs-{sampler}", seed, sampler, size, [*DFS, *args.overrides]))
        ps_dfs = ["genome=ps_dfs", f"genome.ps_source={ps['run_dir']}", *args.overrides]
        runs.append(search(args.work, "ps_dfs-cmaes", seed, "cmaes", size, ps_dfs))

    world = build_world(size="full", seed=0)
    skills = ["combined", "math", "lang"]
    search_tasks = TaskSet(names=tuple(world.tasks[s] for s in skills), include_path=str(world.tasks_dir))
    holdout = TaskSet(names=tuple(world.holdout_tasks[s] for s in skills), include_path=str(world.tasks_dir))
    scored = [
        (name, score_model(path, search_tasks) | score_model(path, holdout))
        for name, path in [("base", world.base), ("math", world.experts["math"]), ("lang", world.experts["lang"])]
    ]
    # A hand-built reference: the path the task seems to ask for, math's layers read through lang's ends.
    obvious = DataFlowRecipe(
        sources=(str(world.base), str(world.experts["math"]), str(world.experts["lang"])),
        path=tuple(PathStep(source=1, layer=layer) for layer in range(3)),
        embedding_source=2,
        dtype="float32",
    )
    folder = write_dataflow_model(obvious, args.work / "export" / "math-layers-lang-ends")
    scored.append(
        ("hand-built: lang ends, math layers 0-2", score_model(folder, search_tasks) | score_model(folder, holdout))
    )
    for run in runs:
        (folder,) = export_run(run["run_dir"], args.work / "export" / f"{run['name']}-{run['seed']}")
        metrics = score_model(folder, search_tasks) | score_model(folder, holdout)
        # The export must score what the search logged: the whole point of exporting exactly.
        assert {k: metrics[k] for k in run["state"].best.metrics} == run["state"].best.metrics, run["name"]
        scored.append((f"{run['name']} (seed {run['seed']})", metrics))

    budget = runs[0]["state"].evaluations
    lines = [
        "# Data-flow-space merging on the toy world: PS, DFS, PS+DFS",
        "",
        f"Command: `python {' '.join(sys.argv)}` (full toy world, seed 0).",
        "",
        f"Objective `combined` = toy_combined/acc; about {budget} evaluations per run in generations of {size}; "
        f"seeds {args.seeds}. PS: task arithmetic over base + math + lang (CMA-ES). DFS: paths through base, math "
        "and lang (3 layers each, 3 repeats: 27 on/off slots, plus the 6 off-diagonal scales of W in "
        "[0.5, 1.5]), embeddings and head from lang. PS+DFS: the same with that seed's PS best as a fourth "
        "source (36 slots, 12 scales), embeddings and head from the PS merge. No path-length cap.",
        "",
        "## Search: best `combined` per run",
        "",
        "| run | best (mean ± std) | per seed | best path length | invalid candidates | s / evaluation |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in dict.fromkeys(run["name"] for run in runs):
        group = [run for run in runs if run["name"] == name]
        bests = [run["state"].best.scores[0] for run in group]
        spread = statistics.stdev(bests) if len(bests) > 1 else 0.0
        paths = ", ".join("-" if run["path"] is None else str(run["path"]) for run in group)
        invalid = ", ".join(str(run["invalid"]) for run in group)
        per_eval = statistics.mean(run["state"].evaluating_s / max(len(run["state"].cache), 1) for run in group)
        lines.append(
            f"| {name} | {statistics.mean(bests):.4f} ± {spread:.4f} | {', '.join(f'{b:.4f}' for b in bests)} "
            f"| {paths} | {invalid} | {per_eval:.3f} |"
        )
    columns = [*search_tasks.names, *holdout.names]
    lines += [
        "",
        "## Bests next to the parents (exported, reloaded, scored; `acc`)",
        "",
        "| model | " + " | ".join(columns) + " |",
        "| --- | " + " | ".join("---" for _ in columns) + " |",
        *[f"| {name} | " + " | ".join(f"{m[f'{c}/acc']:.3f}" for c in columns) + " |" for name, m in scored],
        "",
    ]
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
