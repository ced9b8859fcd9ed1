"""Seconds to a search's first and second candidate in a fresh process: ``InPlaceMerger.materialize`` of a
TIES recipe, the path that compiles fused kernels (methods/fused.py). Point TORCHINDUCTOR_CACHE_DIR at an
empty folder for a cold compile cache.

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python scripts/first_candidate.py BASE EXPERT1 EXPERT2
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

from evomerge.materialize.in_place import InPlaceMerger
from evomerge.recipe.recipe import Recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs=3, help="base, then two fine-tunes of it")
    args = parser.parse_args()
    base, *experts = args.models
    recipe = Recipe.from_plain(
        {
            "method": "ties",
            "base": base,
            "models": [{"model": path, "weight": 1.0, "density": 0.5} for path in experts],
            "dtype": "float32",
        }
    )
    merger = InPlaceMerger(model=AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), template=recipe)
    for which in ("first", "second"):
        started = time.perf_counter()
        merger.materialize(recipe)
        print(f"{which} candidate: {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
