"""Time to quality: how many items a search scores until the held-out score of its best so far reaches the
target, for each way of scoring fewer items (issue 29), over seeds.

    python scripts/fitness_cost.py --world toy --seeds 0 1 2 3 4 --budget 96 --jobs 2
    python scripts/fitness_cost.py --world smollm --seeds 0 1 2 --budget 48 --jobs 1

Each row of ``ROWS`` is a list of Hydra overrides on the world's preset; every row searches the world's large
objective task (evomerge/toy/large_tasks.py: each combined problem asked several ways; 1,034 items in the
toy world, 500 in the SmolLM2 world) with CMA-ES in generations of ``--generation-size`` (a row may name
another optimizer: ``optimizer=...``). Each time a search finds a new best scored on every item of its
task (a row whose ``items`` says fewer were scored is an estimate, never a result), that recipe is merged to
disk and scored on every item of the large held-out task: the curve of held-out score against items scored
so far. Items count every item any candidate was scored on (a raced-out candidate's prefix, an estimated
one's anchors) and the items the estimator's fit scored (irt.json's ``items_scored``).

The target is the every-item search's held-out score at its full budget, median over seeds; a row's time to
quality on a seed is the items scored when its best's held-out score first reaches it ("not reached" counts
as more than any budget). A row that fails to compose (an optimizer this checkout lacks) is skipped and
listed as such. Runs are kept in ``--work`` per (row, seed), under a hash of their overrides: a rerun reuses
finished ones and resumes unfinished ones. Writes results/fitness_cost_<world>.md between its markers (the
reading below them is kept across reruns) and the .png beside it, or ``--out`` and its .png.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from toy_comparison import score_model, toy_config, write_marked_section

from evomerge.config import check_config, register_configs
from evomerge.errors import EvomergeError
from evomerge.io.atomic import atomic_write_bytes, atomic_write_text
from evomerge.materialize.to_disk import merge_to_disk
from evomerge.recipe.recipe import Recipe
from evomerge.search.estimate import FIT_FILE
from evomerge.search.run_folder import RunFolder
from evomerge.search.session import resume, start, task_set
from evomerge.toy import build_world
from evomerge.toy.large_tasks import large_tasks
from evomerge.toy.smollm import build_smol_world
from evomerge.toy.smollm.large_tasks import large_smol_tasks

EVERY, SUBSET = "every item", "random subset"
# Placeholders: {budget} and {long_budget} (candidates), {anchors} (items per candidate), {seed}.
# The cheaper rows get more candidates than every item, so that they can spend as many items.
ROWS: dict[str, list[str]] = {
    EVERY: ["budget.evaluations={budget}"],
    # What mergekit-evolve users do: a fixed random subset of the task, as many items as the anchors.
    SUBSET: ["budget.evaluations={long_budget}", "tasks.limit={anchors}", "tasks.sample_seed={seed}"],
    "racing": ["budget.evaluations={budget}", "racing.enabled=true"],  # it costs about as much as every item
    "IRT": ["budget.evaluations={long_budget}", "estimate.enabled=true", "estimate.anchors={anchors}"],
    # Each generation's best scored on every item only where it could be the best so far (within 0.03).
    "IRT, verified where it can pay": [
        "budget.evaluations={long_budget}",
        "estimate.enabled=true",
        "estimate.anchors={anchors}",
        "estimate.verify_within=0.03",
    ],
    # The same with no warmup generation: fitted on the endpoints, then on each verified best.
    "IRT, no warmup, verified where it can pay": [
        "budget.evaluations={long_budget}",
        "estimate.enabled=true",
        "estimate.anchors={anchors}",
        "estimate.verify_within=0.03",
        "estimate.warmup=0",
    ],
    "IRT, 50 anchors": ["budget.evaluations={long_budget}", "estimate.enabled=true", "estimate.anchors=50"],
    # Smaller generations: a generation's verified best is most of an estimated generation's items.
    "IRT, generations of 4": [
        "budget.evaluations={long_budget}",
        "estimate.enabled=true",
        "estimate.anchors={anchors}",
        "optimizer.popsize=4",
    ],
    # The same optimizer setting on every item, so that the two effects can be told apart.
    "every item, generations of 4": ["budget.evaluations={budget}", "optimizer.popsize=4"],
    # No endpoints, no fit: each generation a new random sample, its mean the estimate; the best verified.
    "sample mean": [
        "budget.evaluations={long_budget}",
        "estimate.enabled=true",
        "estimate.estimator=mean",
        "estimate.anchors={anchors}",
    ],
    "sample mean, generations of 4": [
        "budget.evaluations={long_budget}",
        "estimate.enabled=true",
        "estimate.estimator=mean",
        "estimate.anchors={anchors}",
        "optimizer.popsize=4",
    ],
    "lq-CMA-ES": ["budget.evaluations={budget}", "optimizer=lq_cmaes"],
    "IRT + lq-CMA-ES": [
        "budget.evaluations={long_budget}",
        "optimizer=lq_cmaes",
        "estimate.enabled=true",
        "estimate.anchors={anchors}",
    ],
}
WORLDS = {"toy": (build_world, large_tasks), "smollm": (build_smol_world, large_smol_tasks)}
MEASURED = "measured.json"
BEGIN, END = "<!-- measured figures: regenerated by the command below -->", "<!-- end of measured figures -->"


@dataclasses.dataclass(frozen=True)
class Job:
    row: str
    seed: int
    optimizer: str
    overrides: tuple[str, ...]
    run_dir: Path
    world: str
    generation: int
    holdout: str


def jobs_for(
    rows: dict[str, list[str]], shared: list[str], holdout: str, args: argparse.Namespace
) -> tuple[list[Job], dict[str, str]]:
    """One job per (row, seed) whose config composes, and the rows that do not, with why."""
    jobs, skipped = [], {}
    for row, templates in rows.items():
        for seed in args.seeds:
            values = {"budget": args.budget, "long_budget": args.long_budget, "anchors": args.anchors, "seed": seed}
            filled = [template.format(**values) for template in templates]
            optimizer = next((o.partition("=")[2] for o in filled if o.startswith("optimizer=")), "cmaes")
            overrides = (*shared, *(o for o in filled if not o.startswith("optimizer=")))
            try:
                check_config(toy_config(seed, optimizer, args.generation_size, list(overrides), preset=args.world))
            except (HydraException, OmegaConfBaseException, EvomergeError) as error:
                skipped[row] = f"`{' '.join(filled)}` does not compose here: {str(error).splitlines()[0]}"
                print(f"skipping row {row!r}: {skipped[row]}", flush=True)
                break
            digest = hashlib.sha256(json.dumps([optimizer, overrides]).encode()).hexdigest()[:8]
            slug = "".join(c if c.isalnum() else "-" for c in row.lower())
            run_dir = args.work / f"{slug}-{digest}-seed{seed}"
            jobs.append(Job(row, seed, optimizer, overrides, run_dir, args.world, args.generation_size, holdout))
    return jobs, skipped


def measure(job: Job) -> dict:
    """Run (or resume) one search and trace its held-out curve; cached in the run folder once finished."""
    done = job.run_dir / MEASURED
    if done.exists():
        return {**json.loads(done.read_text()), "reused": True}
    torch.set_num_threads(1)
    register_configs()
    began = time.perf_counter()
    if (job.run_dir / "config.yaml").exists():
        resume(job.run_dir, [], force=False)
    else:
        start(toy_config(job.seed, job.optimizer, job.generation, list(job.overrides), preset=job.world), job.run_dir)
    cfg = OmegaConf.load(job.run_dir / "config.yaml")
    curve, spent = holdout_curve(job.run_dir, cfg, job.holdout)
    result = {
        "row": job.row,
        "seed": job.seed,
        "curve": curve,
        "items": spent,
        "candidates": len(RunFolder(job.run_dir).read_evaluations()),
        "wall_s": time.perf_counter() - began,
    }
    atomic_write_text(done, json.dumps(result))
    result["reused"] = False
    print(
        f"seed {job.seed} {job.row}: {spent} items, held-out best {curve[-1][1] if curve else math.nan:.4f}", flush=True
    )
    return result


def holdout_curve(run_dir: Path, cfg, held_out: str) -> tuple[list[tuple[int, float]], int]:
    """``(items scored so far, held-out score of the best so far)`` at each new best scored on every item of
    its task, and the items the whole search scored (the estimator's fit included)."""
    tasks = task_set(cfg)
    (task,) = tasks.names
    holdout = dataclasses.replace(tasks, names=(held_out,), limit=None)
    total = sum(1 for _ in (Path(tasks.include_path) / task / "test.jsonl").open())
    per_candidate = total if tasks.limit is None else min(tasks.limit, total)
    fit = run_dir / FIT_FILE
    if cfg.estimate.enabled and not fit.exists():
        raise EvomergeError(f"{run_dir} estimated fitness but holds no {FIT_FILE}", "count the fit's items here")
    spent = json.loads(fit.read_text())["items_scored"] if fit.exists() else 0
    curve, best = [], None
    for row in RunFolder(run_dir).read_evaluations():
        if not row["cached"] and row["error"] is None:
            spent += row["items"][0] if "items" in row else per_candidate
        score = row["scores"][0]
        every_item = "items" not in row or row["items"][0] == row["items"][1]
        if every_item and score is not None and (best is None or score > best):
            best = score
            recipe = Recipe.from_plain(row["recipe"], where="log row")
            folder = merge_to_disk(recipe, run_dir / "held-out-best", overwrite=True)
            curve.append((spent, score_model(folder, holdout)[f"{held_out}/acc"]))
    return curve, spent


def held_at(curve: list, items: float) -> float | None:
    """The held-out score of the best found within ``items`` items (None: none yet)."""
    return next((held for spent, held in reversed(curve) if spent <= items), None)


def reached(curve: list, target: float) -> float:
    return next((spent for spent, held in curve if held >= target - 1e-12), math.inf)


def spread(values: list[float], digits: int = 0) -> str:
    """Median (min-max) over seeds; "not reached" where the median is infinite."""

    def show(value: float) -> str:
        return "not reached" if math.isinf(value) else f"{value:,.{digits}f}"

    return f"{show(statistics.median(values))} ({show(min(values))}–{show(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", choices=sorted(WORLDS), default="toy")
    parser.add_argument("--size", default="full", help="the world's size (toy: full, tiny; smollm: full, smoke)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--budget", type=int, default=96, help="candidates of the every-item search")
    parser.add_argument("--long-budget", type=int, default=None, help="candidates of the cheaper rows (default 2x)")
    parser.add_argument(
        "--anchors", type=int, default=100, help="items per candidate: IRT anchors, random subset, sample mean"
    )
    parser.add_argument("--generation-size", type=int, default=8)
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS), help="default: every row")
    parser.add_argument("--jobs", type=int, default=1, help="(row, seed) searches run at once, one process each")
    parser.add_argument("--work", type=Path, default=None, help="default: /tmp/evomerge-fitness-<world>")
    parser.add_argument("--out", type=Path, default=None, help="default: results/fitness_cost_<world>.md")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides shared by every run")
    args = parser.parse_args()
    args.long_budget = args.long_budget or 2 * args.budget
    args.work = args.work or Path(f"/tmp/evomerge-fitness-{args.world}")
    began = time.perf_counter()
    register_configs()
    build, write_large = WORLDS[args.world]
    world = build(size=args.size, seed=0)
    task, held_out = write_large(world)
    total = sum(1 for _ in (world.tasks_dir / task / "test.jsonl").open())
    held_total = sum(1 for _ in (world.tasks_dir / held_out / "test.jsonl").open())
    shared = [
        f"toy.size={args.size}",
        f"tasks.names=[{task}]",
        f"objectives=[{{name: combined, terms: {{{task}/acc: 1.0}}}}]",
        *args.overrides,
    ]
    jobs, skipped = jobs_for({row: ROWS[row] for row in args.rows}, shared, held_out, args)
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(measure, jobs))
    else:
        results = [measure(job) for job in jobs]
    runs: dict[str, list[dict]] = {}
    for result in results:
        runs.setdefault(result["row"], []).append(result)
    if EVERY not in runs:
        raise EvomergeError("no every-item search was measured", "keep the 'every item' row: it sets the target")

    every_final = [r["curve"][-1][1] if r["curve"] else 0.0 for r in runs[EVERY]]
    target = statistics.median(every_final)
    every_items = statistics.median(r["items"] for r in runs[EVERY])
    to_target = {row: [reached(r["curve"], target) for r in group] for row, group in runs.items()}
    medians = {row: statistics.median(values) for row, values in to_target.items()}
    out = args.out or Path(f"results/fitness_cost_{args.world}.md")
    command = shlex.join(["python", *sys.argv])
    lines = [
        f"Regenerated by `{command}` in {(time.perf_counter() - began) / 60:.0f} min (CPU; "
        f"{sum(r['reused'] for r in results)} of {len(results)} searches reused from {args.work}); world `{args.size}-seed0` ({world.root.name}). Objective {task}/acc over {total} items; "
        f"held-out score on every item of {held_out} ({held_total} items). CMA-ES (unless a row says otherwise) "
        f"in generations of {args.generation_size}, seeds {args.seeds}; {args.anchors} items per candidate for "
        f"the random subset and the IRT anchors.",
        "",
        f"Target: the every-item search's held-out score at its full budget, median over seeds: {target:.4f} "
        f"(per seed: {', '.join(f'{v:.4f}' for v in every_final)}). Time to quality: items scored until the "
        "held-out score of the best so far (fully scored candidates only) reaches it; median (min–max) over seeds.",
        "",
        "| row | overrides | items to reach the target | per seed | fewer than every item | >= 3x fewer than "
        "every item | fewer than the random subset | items per search | held-out at the end | wall per search (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row, group in runs.items():
        if math.isinf(medians[row]):
            ratio_text, three, fewer = "not reached", "no", "no"
        else:
            ratio = medians[EVERY] / medians[row]
            ratio_text = f"{ratio:.2f}x"
            three = "—" if row == EVERY else ("yes" if ratio >= 3 else "no")
            subset = medians.get(SUBSET)
            fewer = "—" if row == SUBSET or subset is None else ("yes" if medians[row] < subset else "no")
        per_seed = ", ".join("not reached" if math.isinf(v) else f"{v:,.0f}" for v in to_target[row])
        finals = [r["curve"][-1][1] if r["curve"] else 0.0 for r in group]
        values = {"budget": args.budget, "long_budget": args.long_budget, "anchors": args.anchors, "seed": "SEED"}
        overrides = " ".join(template.format(**values) for template in ROWS[row])
        lines.append(
            f"| {row} | `{overrides}` | {spread(to_target[row])} | {per_seed} | {ratio_text} | {three} | {fewer} "
            f"| {spread([r['items'] for r in group])} | {spread(finals, 3)} | {spread([r['wall_s'] for r in group])} |"
        )
    lines += [""] + [f"Skipped: {row}: {why}." for row, why in skipped.items()] + ([""] if skipped else [])
    budgets = [round(every_items * fraction) for fraction in (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1)]
    lines += [
        "Held-out score of the best so far at equal item budgets (fractions of the every-item search's items), "
        "median (min–max) over seeds; '-' where a seed had no fully scored candidate yet (counted as 0):",
        "",
        "| row | " + " | ".join(f"{b:,} items" for b in budgets) + " |",
        "| --- |" + " --- |" * len(budgets),
    ]
    for row, group in runs.items():
        cells = []
        for budget in budgets:
            values = [held_at(r["curve"], budget) for r in group]
            text = spread([v or 0.0 for v in values], 3)
            cells.append(text + (" -" if None in values else ""))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", "Held-out score of each new best, against items scored so far:", ""]
    lines += ["| seed | row | (items, held-out) |", "| --- | --- | --- |"]
    for row, group in runs.items():
        for r in group:
            points = ", ".join(f"({items}, {held:.3f})" for items, held in r["curve"])
            lines.append(f"| {r['seed']} | {row} | {points} |")
    lines += ["", f"![held-out score against items scored]({out.with_suffix('.png').name})", ""]
    if not out.exists():
        out.write_text(f"# Time to quality: cheaper fitness against scoring every item ({args.world} world)\n\n")
    write_marked_section(out, BEGIN, END, "\n".join(lines))
    draw(runs, target, out.with_suffix(".png"), args.world)
    print("\n".join(lines))


def draw(runs: dict[str, list[dict]], target: float, path: Path, world: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(11, 4.5))
    colours = plt.get_cmap("tab20").colors  # one per row: 20 are more than ROWS holds
    top = max(r["items"] for group in runs.values() for r in group)
    first = min(r["curve"][0][0] for group in runs.values() for r in group if r["curve"])
    grid = sorted({round(first * (top / first) ** (k / 200)) for k in range(201)})
    for (row, group), colour in zip(runs.items(), colours, strict=False):
        for r in group:
            xs = [items for items, _ in r["curve"]] + [r["items"]]
            ys = [held for _, held in r["curve"]] + [r["curve"][-1][1] if r["curve"] else 0.0]
            axes.step(xs, ys, where="post", color=colour, alpha=0.25, linewidth=0.8)
        # Drawn from where most seeds have a fully scored best, as the table counts them.
        values = [[held_at(r["curve"], x) for r in group] for x in grid]
        median = [
            statistics.median(v or 0.0 for v in at) if sum(v is not None for v in at) * 2 > len(at) else math.nan
            for at in values
        ]
        width = 4 if row == EVERY else 2  # under the others, so that a row that follows it exactly shows both
        axes.step(grid, median, where="post", color=colour, linewidth=width, label=f"{row} (median)")
    axes.axhline(target, color="grey", linestyle="--", label="target (every item, median final)")
    axes.set_xscale("log")
    axes.set_xlabel("items scored so far")
    axes.set_ylabel("held-out score of the best so far")
    axes.set_title(f"Time to quality ({world} world; thin lines: one seed each)")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the curves, not over them
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())


if __name__ == "__main__":
    main()
