"""Measure a built toy world and write the figures as markdown: every model on every task (lm-eval),
the chance baseline, the alignment check, and a plain task-arithmetic grid.

The merge here is a few lines of torch on purpose: this report describes the world the merge methods
are tested on, so it must not depend on them.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from evomerge.evaluate.lm_eval_scorer import LMEvalScorer, TaskSet
from evomerge.toy.alignment import alignment_figures
from evomerge.toy.chance import last_operand_accuracy
from evomerge.toy.world import ToyWorld

GRID_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)


def task_arithmetic(base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]], weights: list[float]):
    """base + sum_i w_i (expert_i - base), Ilharco et al. 2023 (arXiv:2212.04089)."""
    return {
        name: tensor + sum(w * (expert[name] - tensor) for w, expert in zip(weights, experts, strict=True))
        for name, tensor in base.items()
    }


def measure_world(world: ToyWorld) -> dict:
    # One thread: a forward pass of this size took 0.14-0.21 s on one thread and 0.66-0.78 s on two
    # on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(world)
    finally:
        torch.set_num_threads(threads)


def _measure(world: ToyWorld) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(world.base)
    models: dict[str, PreTrainedModel] = {
        "base": AutoModelForCausalLM.from_pretrained(world.base),
        **{name: AutoModelForCausalLM.from_pretrained(path) for name, path in world.experts.items()},
    }
    search_tasks = list(world.tasks.values())
    all_tasks = search_tasks + list(world.holdout_tasks.values())
    # Every model is scored by loading its weights into one `scored` model, the way a search worker
    # scores candidates: one lm-eval wrapper, tasks read once.
    scored = AutoModelForCausalLM.from_pretrained(world.base).eval()
    scorer = LMEvalScorer(
        model=scored,
        tokenizer=tokenizer,
        tasks=TaskSet(names=tuple(all_tasks), include_path=str(world.tasks_dir), batch_size=256),
    )

    def accuracy(state: dict[str, torch.Tensor], tasks: list[str]) -> dict[str, float]:
        scored.load_state_dict(state)
        metrics = scorer.score()
        return {name: metrics[f"{name}/acc"] for name in tasks}

    figures: dict = {"accuracy": {}, "alignment": {}}
    figures["accuracy"]["chance (answer = last operand)"] = {
        name: last_operand_accuracy(world.tasks_dir, name) for name in all_tasks
    }
    for name, model in models.items():
        figures["accuracy"][name] = accuracy(model.state_dict(), all_tasks)
        figures["alignment"][name] = alignment_figures(model.eval(), tokenizer)

    base_state = {k: v.clone() for k, v in models["base"].state_dict().items()}
    experts = [models["lang"].state_dict(), models["math"].state_dict()]
    grid, seconds = {}, []
    for a, b in itertools.product(GRID_WEIGHTS, GRID_WEIGHTS):
        start = time.perf_counter()
        grid[(a, b)] = accuracy(task_arithmetic(base_state, experts, [a, b]), search_tasks)
        seconds.append(time.perf_counter() - start)
    combined = world.tasks["combined"]
    best = max(grid, key=lambda weights: grid[weights][combined])
    for label, weights in (
        ("task arithmetic a=1, b=1", (1.0, 1.0)),
        (f"best grid point a={best[0]}, b={best[1]}", best),
    ):
        figures["accuracy"][label] = accuracy(task_arithmetic(base_state, experts, list(weights)), all_tasks)
        figures["alignment"][label] = alignment_figures(scored, tokenizer)
    figures["grid"] = grid
    figures["seconds_per_candidate"] = sorted(seconds)[len(seconds) // 2]
    figures["tasks"] = all_tasks
    return figures


def _row(cells: list) -> str:
    return "| " + " | ".join(f"{c:.2f}" if isinstance(c, float) else str(c) for c in cells) + " |"


def render_report(world: ToyWorld, figures: dict, command: str) -> str:
    tasks = figures["tasks"]
    lines = [
        "## Measured figures",
        "",
        f"World `{world.root.name}`. Regenerate with `{command}` (builds the world first if not cached).",
        "",
        "Build times (s, recorded at build): "
        + ", ".join(f"{name} {seconds:.1f}" for name, seconds in world.build_seconds.items()),
        "",
        "### Accuracy (lm-eval `acc`: the greedy next token is the answer numeral)",
        "",
        _row(["model", *tasks]),
        _row(["---"] * (len(tasks) + 1)),
    ]
    lines += [_row([name, *(scores[t] for t in tasks)]) for name, scores in figures["accuracy"].items()]
    lines += [
        "",
        "### Alignment of L2 with L1",
        "",
        "Embedding cosine of each L2 word with its L1 twin, against different L1 words; hidden states:",
        "cosine of mean-pooled states of an L1 sentence and its L2 translation, per layer (embeddings first),",
        "against two different L1 sentences.",
        "",
        _row(["model", "twin cosine", "unrelated cosine", "twin is nearest", "hidden parallel", "hidden unrelated"]),
        _row(["---"] * 6),
    ]
    for name, align in figures["alignment"].items():
        lines.append(
            _row(
                [
                    name,
                    align["twin_cosine"],
                    align["unrelated_cosine"],
                    align["twin_nearest"],
                    " ".join(f"{x:.2f}" for x in align["hidden_parallel"]),
                    " ".join(f"{x:.2f}" for x in align["hidden_unrelated"]),
                ]
            )
        )
    combined = world.tasks["combined"]
    lines += [
        "",
        f"### Task arithmetic base + a·Δlang + b·Δmath: `{combined}` (search split)",
        "",
        _row(["a \\ b", *GRID_WEIGHTS]),
        _row(["---"] * (len(GRID_WEIGHTS) + 1)),
    ]
    lines += [_row([a, *(figures["grid"][(a, b)][combined] for b in GRID_WEIGHTS)]) for a in GRID_WEIGHTS]
    lines += [
        "",
        f"Median lm-eval time to score one candidate on {len(world.tasks)} tasks: "
        f"{figures['seconds_per_candidate']:.2f} s.",
        "",
    ]
    return "\n".join(lines)


MEASURED_START = "<!-- measured figures: regenerated by the command below; edit outside these markers -->"
MEASURED_END = "<!-- end of measured figures -->"


def write_report(world: ToyWorld, path: Path, command: str) -> None:
    """Write the measured figures into ``path``, keeping any hand-written text outside the markers."""
    measured = f"{MEASURED_START}\n{render_report(world, measure_world(world), command)}\n{MEASURED_END}"
    text = path.read_text() if path.exists() else ""
    if MEASURED_START in text and MEASURED_END in text:
        before, rest = text.split(MEASURED_START, 1)
        text = before + measured + rest.split(MEASURED_END, 1)[1]
    else:
        text = measured + "\n" + text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
