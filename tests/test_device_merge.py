"""Merges at a size where the compiled kernels run (over 2**15 entries a tensor), on every device here.

The toy world's tensors are small enough that every fused method runs its eager twin; these models are
not. On CUDA the fused kernels are Triton's, whose rounding is only as good as `emulate_precision_casts`:
the in-place merge must still equal the to-disk merge bit for bit, in float32 and bfloat16, for every
method. On a machine without CUDA the same checks run on the CPU (inductor's C++ kernels), in float32
only, to keep the suite short.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from evomerge.io.checkpoint import Checkpoint
from evomerge.materialize.in_place import InPlaceMerger
from evomerge.materialize.to_disk import merge_to_disk
from evomerge.methods import fused, method_names
from evomerge.recipe.recipe import Recipe
from tests.test_merge import RECIPES

CASES = [("cuda", dtype) for dtype in ("float32", "bfloat16")] if torch.cuda.is_available() else [("cpu", "float32")]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A base and two fine-tunes (base plus noise), 256 wide: MLP weights hold 180,224 entries."""
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    folder = tmp_path_factory.mktemp("large")
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    paths = {"base": str(folder / "base")}
    base.save_pretrained(paths["base"])
    for i, name in enumerate(("lang", "math")):
        generator = torch.Generator().manual_seed(i + 1)
        tuned = LlamaForCausalLM(config)
        with torch.no_grad():
            for (_, mine), theirs in zip(tuned.named_parameters(), base.parameters(), strict=True):
                mine.copy_(theirs + 0.02 * torch.randn(theirs.shape, generator=generator))
        paths[name] = str(folder / name)
        tuned.save_pretrained(paths[name])
    return paths


def recipe_for(paths: dict[str, str], method: str, dtype: str) -> Recipe:
    spec = RECIPES[method]
    entries = []
    for i, name in enumerate(spec["models"]):
        entry = {"model": paths[name]}
        entry.update({key: spec[key][i] for key in ("weight", "density", "gamma", "epsilon") if key in spec})
        entries.append(entry)
    base = spec.get("base", "base")
    return Recipe.from_plain(
        {
            "method": method,
            "base": None if base is None else paths["base"],
            "models": entries,
            "parameters": spec.get("parameters", {}),
            "dtype": dtype,
            "seed": 7,
        }
    )


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize("method", method_names())
def test_in_place_equals_to_disk_with_compiled_kernels(models, tmp_path, method, device, dtype):
    recipe = recipe_for(models, method, dtype)
    out = merge_to_disk(recipe, tmp_path / "merged", device=device)
    live = AutoModelForCausalLM.from_pretrained(models["base"], dtype=getattr(torch, dtype)).to(device)
    merger = InPlaceMerger(model=live, template=recipe)
    merger.materialize(recipe)  # eagerly: the fused kernels compile after the first candidate (methods/fused.py)
    fused.wait_for_kernels()
    merger.materialize(recipe)  # with them
    written = Checkpoint.open(out)
    params = dict(live.named_parameters())
    assert params["model.layers.0.mlp.up_proj.weight"].numel() > 2**15
    for name in written.names:
        assert torch.equal(params[name].cpu(), written.load(name)), name
    base = Checkpoint.open(models["base"]).load("model.layers.1.mlp.down_proj.weight")
    assert not torch.equal(params["model.layers.1.mlp.down_proj.weight"].cpu().float(), base)
