"""Measure a built SmolLM2 world: base, each expert and the default merges on every task, and chance.

This is the check that the world is worth searching on: the combined task must be hard for every parent,
and the default merges must leave room for a search. The default merges go through evomerge's own
``merge_to_disk`` (the methods under test elsewhere, with their usual settings), one folder at a time.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.evaluate.lm_eval_scorer import LMEvalScorer, TaskSet
from evomerge.materialize.to_disk import merge_to_disk
from evomerge.recipe.recipe import Recipe
from evomerge.toy.smollm.world import TORCH_THREADS, SmolWorld

# The usual settings: weight 1 per expert for task arithmetic (Ilharco et al. 2023), density 0.5 for
# TIES (Yadav et al. 2023) and DARE-TIES (Yu et al. 2024), as in mergekit's examples and the paper's baselines.
DEFAULT_MERGES = {
    "task arithmetic (weight 1 each)": {"method": "task_arithmetic", "models": {"weight": 1.0}},
    "TIES (density 0.5, weight 1 each)": {"method": "ties", "models": {"weight": 1.0, "density": 0.5}},
    "DARE-TIES (density 0.5, weight 1 each)": {"method": "dare_ties", "models": {"weight": 1.0, "density": 0.5}},
}


def majority_accuracy(tasks_dir: Path, task: str) -> float:
    """Chance: always answering the task's most common answer."""
    answers = [json.loads(line)["answer"] for line in (tasks_dir / task / "test.jsonl").read_text().splitlines()]
    return Counter(answers).most_common(1)[0][1] / len(answers)


def measure_smol_world(world: SmolWorld, scratch: Path) -> dict[str, dict[str, float]]:
    """``{model: {task: acc}}`` over the search and held-out tasks; merged folders are written under
    ``scratch`` and removed once scored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    try:
        return _measure(world, scratch)
    finally:
        torch.set_num_threads(threads)


def _measure(world: SmolWorld, scratch: Path) -> dict[str, dict[str, float]]:
    tasks = [*world.tasks.values(), *world.holdout_tasks.values()]
    tokenizer = AutoTokenizer.from_pretrained(world.base)
    scored = AutoModelForCausalLM.from_pretrained(world.base, dtype=torch.float32).eval()
    scorer = LMEvalScorer(
        model=scored,
        tokenizer=tokenizer,
        tasks=TaskSet(names=tuple(tasks), include_path=str(world.tasks_dir), batch_size=64),
    )

    def accuracy(folder: Path) -> dict[str, float]:
        start = time.perf_counter()
        state = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
        scored.load_state_dict(state)
        metrics = scorer.score()
        return {**{name: metrics[f"{name}/acc"] for name in tasks}, "seconds": time.perf_counter() - start}

    figures = {"chance (most common answer)": {name: majority_accuracy(world.tasks_dir, name) for name in tasks}}
    figures["base"] = accuracy(world.base)
    for name, folder in world.experts.items():
        figures[f"{name} expert"] = accuracy(folder)
    for label, spec in DEFAULT_MERGES.items():
        recipe = Recipe.from_plain(
            {
                "method": spec["method"],
                "base": str(world.base),
                "models": [{"model": str(path), **spec["models"]} for path in world.experts.values()],
                "dtype": "float32",
            }
        )
        folder = merge_to_disk(recipe, scratch / spec["method"], overwrite=True)
        figures[label] = accuracy(folder)
        shutil.rmtree(folder)
    return figures


def render_table(world: SmolWorld, figures: dict[str, dict[str, float]]) -> str:
    skills = list(world.tasks)
    header = ["model", *(f"{s} (search)" for s in skills), *(f"{s} (held-out)" for s in skills)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, scores in figures.items():
        cells = [scores[world.tasks[s]] for s in skills] + [scores[world.holdout_tasks[s]] for s in skills]
        lines.append("| " + " | ".join([name, *(f"{c:.3f}" for c in cells)]) + " |")
    return "\n".join(lines)
