"""The README's demo: build the toy world (cached), merge its experts, and load the result."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.materialize.to_disk import merge_to_disk
from evomerge.recipe.recipe import Recipe
from evomerge.toy import build_world


def run_demo(*, out_dir: Path = Path("demo"), size: str = "full", seed: int = 0) -> Path:
    world = build_world(size=size, seed=seed)
    recipe = Recipe.from_plain(
        {
            "method": "task_arithmetic",
            "base": str(world.base),
            "models": [{"model": str(path), "weight": 1.0} for path in world.experts.values()],
            "dtype": "float32",
        }
    )
    merged = merge_to_disk(recipe, out_dir / "merged", overwrite=True)
    model = AutoModelForCausalLM.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    ids = tokenizer("three plus four is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    print(
        f"merged {len(world.experts)} experts into {merged}; reloaded, logits finite: {bool(logits.isfinite().all())}"
    )
    return merged
