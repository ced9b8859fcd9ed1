"""Twin-Merging against static merges on a world's mixed held-out tasks: the toy world (results/twin_toy.md)
or the real-model SmolLM2-135M world (results/twin_smollm.md).

    python scripts/twin_toy.py --size tiny --budget 32 --ranks 1 4 16
    python scripts/twin_toy.py --world smollm --budget 48 --ranks 4 16 64
    python scripts/twin_toy.py --world smollm --run /tmp/evomerge-smollm-results/ps-1 --ranks 4 16 64

A short CMA-ES search (the world's preset: task arithmetic, objective its combined task) gives the
searched static merge, or --run names a finished PS run folder of that world to use instead; `build_twin`
turns that run into Twin models at each rank, the router trained on the run's search tasks. Every model
is scored on the held-out twins of all three tasks (disjoint items), the Twin models after export and
reload, as a user loads them. Routing accuracy: how often the router's top expert is the expert with the
lowest loss on a held-out item (the label it was trained on).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from toy_comparison import score_model, search, toy_config
from toy_results import WORLDS
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.config import register_configs
from evomerge.evaluate.lm_eval_scorer import LMEvalScorer, TaskSet
from evomerge.export import export_run
from evomerge.materialize.to_disk import merge_to_disk
from evomerge.recipe.recipe import Recipe
from evomerge.search.run_folder import RunFolder
from evomerge.twin.build import build_twin
from evomerge.twin.items import task_items
from evomerge.twin.router import continuation_losses, scored_inputs

TITLES = {"toy": "the toy world", "smollm": "the SmolLM2-135M world"}
SIZES = {"toy": "tiny", "smollm": "full"}  # --size's default per world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", choices=sorted(TITLES), default="toy")
    parser.add_argument("--size", choices=["tiny", "full"], default=None, help="default: tiny toy, full SmolLM2")
    parser.add_argument("--budget", type=int, default=32, help="evaluations of the CMA-ES search")
    parser.add_argument("--run", type=Path, default=None, help="a finished PS run folder of this world: no search")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    args.size = args.size or SIZES[args.world]
    torch.set_num_threads(1)
    register_configs()
    work = Path(tempfile.mkdtemp(prefix="twin_toy-"))
    began = time.perf_counter()
    if args.run is None:
        overrides = [f"toy.size={args.size}", f"budget.evaluations={args.budget}"]
        run_dir = search(work, "ps", 1, "cmaes", 8, overrides, preset=args.world)["run_dir"]
    else:
        run_dir = args.run
    cfg = OmegaConf.load(RunFolder(run_dir).config_path)
    world = WORLDS[args.world]["build"](toy_config(0, "cmaes", 1, [f"toy.size={args.size}"], preset=args.world))
    # The Twin model's experts are the run's, in its order; the label of an item is an index into them.
    names = {str(path): skill for skill, path in world.experts.items()}
    experts = [names[str(path)] for path in cfg.models.experts]
    skills = experts + [s for s in WORLDS[args.world]["skills"] if s not in experts]
    holdout = TaskSet(
        names=tuple(world.holdout_tasks[s] for s in skills),
        include_path=str(world.tasks_dir),
        batch_size=cfg.tasks.batch_size,
        model_args=dict(cfg.tasks.get("model_args") or {}),
    )
    rows = [(f"{skill} expert", score_model(world.experts[skill], holdout), "") for skill in experts]
    default = Recipe.from_plain(
        {
            "method": "task_arithmetic",
            "base": str(cfg.models.base),
            "models": [{"model": str(path), "weight": 1.0} for path in cfg.models.experts],
        }
    )
    rows.append(("default merge (task arithmetic 1, 1)", score_model(merge_to_disk(default, work / "ta"), holdout), ""))
    (searched,) = export_run(run_dir, work / "searched")
    spent = RunFolder(run_dir).load_checkpoint().evaluations
    rows.append((f"searched static merge (CMA-ES, {spent} evaluations)", score_model(searched, holdout), ""))
    items = task_items(list(holdout.names), include_path=holdout.include_path)
    inputs = scored_inputs(AutoTokenizer.from_pretrained(world.base), items)
    labels = torch.stack(
        [continuation_losses(AutoModelForCausalLM.from_pretrained(world.experts[e]).eval(), inputs) for e in experts],
        dim=1,
    ).argmin(dim=1)
    for rank in args.ranks:
        out, summary = build_twin(run_dir, work / f"twin-{rank}", svd_rank=rank)
        model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        scores = LMEvalScorer(
            model=model, tokenizer=AutoTokenizer.from_pretrained(out, trust_remote_code=True), tasks=holdout
        ).score()
        with torch.no_grad():
            picked = torch.stack([model.route(torch.tensor([whole[:-1]]))[0] for whole, _ in inputs]).argmax(dim=1)
        accuracy = (picked == labels).float().mean().item()
        size = f"{summary.kept_bytes / summary.experts_bytes:.1%} of experts"
        rows.append((f"Twin, rank {rank} ({size})", scores, f"{accuracy:.1%} (train {summary.router_accuracy:.1%})"))
        del model
        shutil.rmtree(out)  # a 135M Twin folder is about 0.6 GB
    wall = time.perf_counter() - began
    print(write_table(args, world, holdout, rows, experts, labels, wall))
    shutil.rmtree(work)


def write_table(
    args, world, holdout: TaskSet, rows: list, experts: list[str], labels: torch.Tensor, wall: float
) -> str:
    names = list(holdout.names)
    counts = ", ".join(f"{e} {int((labels == i).sum())}" for i, e in enumerate(experts))
    lines = [
        f"# Twin-Merging on {TITLES[args.world]}",
        "",
        f"Regenerated by `{shlex.join(['python', *sys.argv])}` on the {args.size} "
        f"{TITLES[args.world].removeprefix('the ')} (seed 0, `{world.root}`), CPU, "
        f"{wall / 60:.1f} min on a shared 2-core machine. Held-out items: "
        + ", ".join(f"{n}" for n in names)
        + f"; lowest-loss expert labels: {counts}.",
        "",
        "| model | " + " | ".join(n.removesuffix("_holdout") for n in names) + " | mean | routing accuracy |",
        "| --- | " + " | ".join("---" for _ in names) + " | --- | --- |",
    ]
    for name, scores, routing in rows:
        accs = [scores[f"{n}/acc"] for n in names]
        cells = " | ".join(f"{a:.3f}" for a in accs)
        lines.append(f"| {name} | {cells} | {sum(accs) / len(accs):.3f} | {routing} |")
    text = "\n".join(lines) + "\n"
    Path(f"results/twin_{args.world}.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
