"""What the toy-world comparison scripts share: run one search from the toy preset, score a model folder
as a user would load it, and rewrite a marked section of a results file.

Imported by compare_optimizers.py, compare_dfs.py and toy_results.py (Python puts a script's folder on
the import path, so `python scripts/<name>.py` finds this module).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.config import CONF_DIR
from evomerge.evaluate.lm_eval_scorer import LMEvalScorer, TaskSet
from evomerge.io.atomic import atomic_write_text
from evomerge.search.run_folder import RunFolder
from evomerge.search.session import start

# Equal budgets mean equal generation sizes too, so no optimizer overshoots the budget more than another.
GENERATION_KEY = {
    "cmaes": "popsize",
    "lq_cmaes": "popsize",
    "random": "batch_size",
    "tpe": "batch_size",
    "nsga2": "population_size",
}


def toy_config(seed: int, optimizer: str, generation: int, overrides: list[str], *, preset: str = "toy") -> DictConfig:
    """A world's preset (the toy world's, or ``smollm``) with this optimizer, generation size and seed;
    ``overrides`` are applied last."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                f"preset={preset}",
                f"optimizer={optimizer}",
                f"optimizer.{GENERATION_KEY[optimizer]}={generation}",
                f"seed={seed}",
                *overrides,
            ],
        )


def search(
    work: Path, name: str, seed: int, optimizer: str, generation: int, extra: list[str], *, preset: str = "toy"
) -> dict:
    """Run one search into ``work/<name>-<seed>`` and say what came of it."""
    cfg = toy_config(seed, optimizer, generation, extra, preset=preset)
    run_dir = work / f"{name}-{seed}"
    began = time.perf_counter()
    state = start(cfg, run_dir)
    rows = RunFolder(run_dir).read_evaluations()
    return {
        "name": name,
        "seed": seed,
        "run_dir": run_dir,
        "config": cfg,
        "state": state,
        "wall": time.perf_counter() - began,
        "invalid": sum(row["error"] is not None for row in rows),
        "path": len(state.best.recipe["path"]) if "path" in state.best.recipe else None,
        "first_generation_best": max(
            (row["scores"][0] for row in rows if row["generation"] == 0 and row["error"] is None), default=math.nan
        ),
    }


def score_model(folder: Path, tasks: TaskSet) -> dict[str, float]:
    """Every metric of ``tasks`` for the model folder, loaded the way a user loads an exported merge."""
    remote = (folder / "modeling_dataflow.py").exists()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=remote)
    return LMEvalScorer(
        model=model, tokenizer=AutoTokenizer.from_pretrained(folder, trust_remote_code=remote), tasks=tasks
    ).score()


def write_marked_section(path: Path, begin: str, end: str, body: str) -> None:
    """Put ``body`` between the markers in ``path``, atomically, keeping every line outside them.

    A file without the markers keeps its text and gets the section appended at its end."""
    text = path.read_text() if path.exists() else ""
    section = begin + "\n" + body.removesuffix("\n") + "\n" + end
    if begin in text and end in text.partition(begin)[2]:
        before, _, rest = text.partition(begin)
        text = before + section + rest.partition(end)[2]
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + section + "\n"
    atomic_write_text(path, text)
