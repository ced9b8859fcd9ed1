"""End-to-end merges of the tiny toy models: to disk, reloaded by transformers, and in place."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge.io.checkpoint import Checkpoint
from evomerge.materialize.in_place import InPlaceMerger
from evomerge.materialize.to_disk import merge_to_disk
from evomerge.methods import get_method
from evomerge.recipe.recipe import Recipe, load_recipe

# One recipe per method, with per-layer gradients and filters where the method takes them.
RECIPES = {
    "linear": {"models": ["lang", "math"], "base": None, "weight": [[0.3, 0.7], 0.5]},
    "slerp": {"models": ["math"], "parameters": {"t": [0.2, 0.8]}},
    "task_arithmetic": {"models": ["lang", "math"], "weight": [{"self_attn": 0.8, "default": 1.0}, 0.6]},
    "ties": {"models": ["lang", "math"], "weight": [1.0, 0.5], "density": [[0.3, 0.9], 0.5]},
    "dare_ties": {"models": ["lang", "math"], "weight": [1.0, 1.0], "density": [0.6, 0.4]},
    "dare_linear": {"models": ["lang", "math"], "weight": [0.7, 0.7], "density": [0.5, 0.5]},
    "breadcrumbs": {"models": ["lang", "math"], "weight": [1.0, 1.0], "density": [0.8, 0.8], "gamma": [0.05, 0.05]},
    "breadcrumbs_ties": {
        "models": ["lang", "math"],
        "weight": [1.0, 1.0],
        "density": [0.8, 0.8],
        "gamma": [0.05, 0.05],
    },
    "della": {"models": ["lang", "math"], "weight": [1.0, 1.0], "density": [0.6, 0.6], "epsilon": [0.1, 0.1]},
    "della_linear": {"models": ["lang", "math"], "weight": [1.0, 1.0], "density": [0.6, 0.6], "epsilon": [0.1, 0.1]},
    "model_stock": {"models": ["lang", "math"]},
    "sce": {"models": ["lang", "math"], "parameters": {"select_topk": [0.3, 0.9]}},
    # nuslerp and multislerp take a base where the recipe names one: one of each, with and without.
    "nuslerp": {"models": ["lang", "math"], "weight": [0.3, 0.7], "parameters": {"nuslerp_flatten": False}},
    "multislerp": {"models": ["lang", "math"], "base": None, "weight": [[0.2, 0.8], 0.5]},
    "karcher": {"models": ["lang", "math"], "base": None},
    "nearswap": {"models": ["math"], "parameters": {"t": [0.001, 0.004]}},
    "arcee_fusion": {"models": ["math"]},
}


def make_recipe(world, method: str, seed: int = 7) -> Recipe:
    spec = RECIPES[method]
    models = []
    for i, name in enumerate(spec["models"]):
        entry = {"model": str(world.experts[name])}
        for key in ("weight", "density", "gamma", "epsilon"):
            if key in spec:
                entry[key] = spec[key][i]
        models.append(entry)
    base = spec.get("base", "base")
    return Recipe.from_plain(
        {
            "method": method,
            "base": None if base is None else str(world.base),
            "models": models,
            "parameters": spec.get("parameters", {}),
            "dtype": "float32",
            "seed": seed,
        }
    )


def test_every_method_has_a_recipe_here():
    from evomerge.methods import method_names

    assert sorted(RECIPES) == method_names()


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_to_disk_reloads_and_equals_in_place(toy_world, tmp_path, method):
    recipe = make_recipe(toy_world, method)
    out = merge_to_disk(recipe, tmp_path / "merged", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert load_recipe(out / "evomerge_recipe.yaml") == recipe
    assert load_recipe(out / "mergekit_config.yml").canonical() == recipe.canonical().replace('"seed": 7', '"seed": 0')
    # The card calls the mergekit config the same merge only where mergekit's output is the same model: a
    # random method's masks come from mergekit's one global generator there, not from our per-tensor seeds.
    card = (out / "README.md").read_text()
    assert ("## The same merge for mergekit" in card) != get_method(method).random
    assert ("not the same model" in card) == get_method(method).random

    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        assert model(ids).logits.isfinite().all()

    # The in-place path writes the same numbers into a loaded model.
    live = AutoModelForCausalLM.from_pretrained(toy_world.base, dtype=torch.float32)
    InPlaceMerger(model=live, template=recipe).materialize(recipe)
    written = Checkpoint.open(out)
    params = dict(live.named_parameters())
    for name in written.names:
        assert torch.equal(params[name], written.load(name)), name


def test_merge_changes_weights_and_random_methods_follow_the_seed(toy_world, tmp_path):
    a = merge_to_disk(make_recipe(toy_world, "dare_ties", seed=1), tmp_path / "a")
    b = merge_to_disk(make_recipe(toy_world, "dare_ties", seed=1), tmp_path / "b")
    c = merge_to_disk(make_recipe(toy_world, "dare_ties", seed=2), tmp_path / "c")
    name = "model.layers.0.mlp.up_proj.weight"
    ta, tb, tc = (Checkpoint.open(p).load(name) for p in (a, b, c))
    assert torch.equal(ta, tb) and not torch.equal(ta, tc)
    base = Checkpoint.open(toy_world.base).load(name)
    assert not torch.equal(ta, base)


def test_in_place_reuses_resident_sources_across_candidates(toy_world):
    template = make_recipe(toy_world, "ties")
    live = AutoModelForCausalLM.from_pretrained(toy_world.base, dtype=torch.float32)
    merger = InPlaceMerger(model=live, template=template)
    name = "model.layers.0.self_attn.q_proj.weight"
    param = dict(live.named_parameters())[name]
    pointer = param.data_ptr()
    merger.materialize(template)
    first = param.detach().clone()
    other = Recipe.from_plain({**template.to_plain(), "parameters": {"lambda": 0.5}})
    merger.materialize(other)
    assert param.data_ptr() == pointer  # written in place, not replaced
    base = Checkpoint.open(toy_world.base).load(name)
    # lambda scales the merged task vector: base + 0.5 * (first - base)
    torch.testing.assert_close(param.detach(), base + 0.5 * (first - base), rtol=1e-5, atol=1e-6)


def test_in_place_dare_keeps_one_seeds_draws_and_follows_a_new_seed(toy_world, tmp_path):
    """DARE's draws are kept per resident tensor for the recipe's seed; a candidate under another seed
    draws afresh (the old draws are dropped, not kept beside) and equals that seed's merge to disk."""
    first, second = make_recipe(toy_world, "dare_ties", seed=1), make_recipe(toy_world, "dare_ties", seed=2)
    live = AutoModelForCausalLM.from_pretrained(toy_world.base, dtype=torch.float32)
    merger = InPlaceMerger(model=live, template=first)
    merger.materialize(first)
    merger.materialize(second)
    assert [seed for _, seed in merger._precomputed] == [2]
    written = Checkpoint.open(merge_to_disk(second, tmp_path / "seed2"))
    params = dict(live.named_parameters())
    for name in written.names:
        assert torch.equal(params[name], written.load(name)), name
