"""Data-flow-space merging on the tiny toy world: routed models against the source layers run by hand,
the KV cache, the genome's map worked by hand, recipes and their errors."""

from __future__ import annotations

import inspect

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from evomerge.errors import EvomergeError
from evomerge.genome.dfs import DataFlowGenome
from evomerge.materialize.dataflow import DataFlowRouter, PathLayer, open_sources
from evomerge.optimizer.cmaes import CMAESOptimizer
from evomerge.optimizer.optuna_sampler import TPEOptimizer
from evomerge.optimizer.space import BinaryDim, FloatDim
from evomerge.recipe.dataflow import DataFlowRecipe, PathStep, to_passthrough
from evomerge.recipe.plain import recipe_from_plain
from evomerge.recipe.recipe import Recipe

IDS = torch.tensor([[2, 5, 6, 7, 8, 9, 10, 11], [2, 12, 13, 14, 15, 16, 17, 18]])


@pytest.fixture(scope="module")
def sources(toy_world):
    """base (2 layers), math (2 layers) and a 3-layer model of the same width."""
    return (str(toy_world.base), str(toy_world.experts["math"]), str(toy_world.incompatible["layers"]))


@pytest.fixture(scope="module")
def router(sources):
    torch.manual_seed(0)
    template = DataFlowRecipe(sources=sources, path=(), embedding_source=1)
    return DataFlowRouter.load(template, device=torch.device("cpu"), dtype=torch.float32)


def recipe(sources, *steps, embedding_source=1, cap=None):
    path = tuple(PathStep(source=s, layer=layer, scale=scale) for s, layer, scale in steps)
    return DataFlowRecipe(sources=sources, path=path, embedding_source=embedding_source, max_path_length=cap)


@torch.no_grad()
def by_hand(sources, steps, ids, embedding_source=1):
    """Embed with one model, run the named layers of freshly loaded models in order, read out."""
    models = [AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval() for path in sources]
    ends = models[embedding_source].model
    hidden = ends.embed_tokens(ids)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    rotary = ends.rotary_emb(hidden, positions)
    for source, layer, scale in steps:
        hidden = hidden * scale if scale != 1.0 else hidden
        # No mask: attention is causal by itself when no padding is given.
        hidden = models[source].model.layers[layer](hidden, position_embeddings=rotary, position_ids=positions)
    return models[embedding_source].lm_head(ends.norm(hidden))


@torch.no_grad()
def test_a_hand_built_path_equals_the_source_layers_run_by_hand(sources, router):
    steps = [(0, 0, 1.0), (2, 2, 1.25), (1, 1, 0.8), (0, 0, 1.0), (2, 0, 1.0)]
    router.materialize(recipe(sources, *steps))
    logits = router.model(IDS).logits
    torch.testing.assert_close(logits, by_hand(sources, steps, IDS), rtol=0, atol=1e-6)
    assert not torch.allclose(logits, by_hand(sources, [(0, 0, 1.0), (2, 2, 1.0), *steps[2:]], IDS), atol=1e-3)


@torch.no_grad()
def test_a_path_through_one_model_reproduces_it_exactly(sources, router):
    router.materialize(recipe(sources, (1, 0, 1.0), (1, 1, 1.0)))
    math = AutoModelForCausalLM.from_pretrained(sources[1], dtype=torch.float32).eval()
    assert torch.equal(router.model(IDS).logits, math(IDS).logits)


def test_layers_are_the_sources_modules_not_copies(sources, router):
    router.materialize(recipe(sources, (0, 1, 1.0), (2, 1, 1.0), (0, 1, 1.0)))
    first, _, third = router.model.model.layers
    assert isinstance(first, PathLayer) and first.layer is third.layer is router.layers[0][1]
    assert router.model.config.num_hidden_layers == 3
    # Only the layers' modules are shared: no parameter exists twice among the model's parameters.
    pointers = [p.data_ptr() for p in router.model.parameters()]
    assert len(pointers) == len(set(pointers))


@torch.no_grad()
def test_the_kv_cache_gives_each_position_its_own_slot(sources, router):
    # Layer (0, 0) runs at positions 0 and 2: with one cache slot per module the third position
    # would attend to the first position's keys, and cached decoding would drift from full recompute.
    router.materialize(recipe(sources, (0, 0, 1.0), (1, 1, 1.3), (0, 0, 0.7), (2, 2, 1.0)))
    model = router.model
    prefix = model(IDS[:, :-1], use_cache=True)
    assert len(prefix.past_key_values.layers) == 4
    # transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name goes in 5.40)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    step = model(IDS[:, -1:], **{name: prefix.past_key_values}, use_cache=True)
    torch.testing.assert_close(step.logits[:, -1], model(IDS).logits[:, -1], rtol=0, atol=1e-5)

    generated = model.generate(IDS[:1], max_new_tokens=10, do_sample=False)
    greedy = IDS[:1]
    for _ in range(10):
        next_token = model(greedy, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        greedy = torch.cat([greedy, next_token], dim=1)
    assert torch.equal(generated, greedy)


def test_invalid_paths_are_refused_and_leave_the_model_as_it_was(sources, router):
    router.materialize(recipe(sources, (1, 0, 1.0)))
    with pytest.raises(EvomergeError, match="path is empty"):
        router.materialize(recipe(sources))
    with pytest.raises(EvomergeError, match="3 layers, more than max_path_length = 2"):
        router.materialize(recipe(sources, (0, 0, 1.0), (0, 1, 1.0), (1, 0, 1.0), cap=2))
    with pytest.raises(EvomergeError, match="layer 2 of .*base', which has 2 layers"):
        router.materialize(recipe(sources, (0, 2, 1.0)))
    with pytest.raises(EvomergeError, match="not the ones this model holds"):
        router.materialize(recipe(sources, (0, 0, 1.0), embedding_source=0))
    assert len(router.model.model.layers) == 1 and router.model.config.num_hidden_layers == 1


def test_sources_of_another_width_are_refused(toy_world):
    with pytest.raises(EvomergeError, match="hidden_size = 48 but .* has hidden_size = 32"):
        open_sources([str(toy_world.base), str(toy_world.incompatible["hidden"])])


def test_the_genome_maps_indicators_and_scales_as_worked_by_hand(sources):
    # Sources with 2 and 3 layers, 2 repeats: slots (m0 l0, m0 l1, m1 l0, m1 l1, m1 l2) twice = 10.
    genome = DataFlowGenome(sources=sources[:2], layer_counts=[2, 3], embedding_source=1, repeats=2)
    assert genome.dimension == 10 + 2  # W without its diagonal: m0->m1, m1->m0
    assert [type(d) for d in genome.space] == [BinaryDim] * 10 + [FloatDim] * 2
    assert genome.space.names[-2:] == ("scale.m0_to_m1", "scale.m1_to_m0")
    on = [1, 0, 0, 0, 1, 1, 1, 0, 0, 0]  # m0 l0, m1 l2, then (repeat 1) m0 l0, m0 l1
    got = genome.to_recipe([*on, 0.25, 0.9])
    # Embedding from m1, so m0 l0 is entered from m1 (W[1, 0] = 0.5 + 0.9 = 1.4), m1 l2 from m0
    # (W[0, 1] = 0.5 + 0.25 = 0.75), m0 l0 from m1 again, then m0 l1 from m0 (diagonal: 1).
    assert [(s.source, s.layer) for s in got.path] == [(0, 0), (1, 2), (0, 0), (0, 1)]
    assert [s.scale for s in got.path] == pytest.approx([1.4, 0.75, 1.4, 1.0])
    assert genome.to_recipe([0.0] * 12).path == ()  # empty: the worker refuses it, the search scores it worst

    per_position = DataFlowGenome(
        sources=sources[:2], layer_counts=[2, 3], repeats=2, scales_per_position=True, search_diagonal=True
    )
    assert per_position.dimension == 10 + 10 * 2


@pytest.mark.parametrize("optimizer", [CMAESOptimizer, TPEOptimizer])
def test_both_optimizers_propose_on_off_indicators(sources, optimizer):
    genome = DataFlowGenome(sources=sources[:2], layer_counts=[2, 3], repeats=2)
    proposals = optimizer(space=genome.space, n_objectives=1, seed=0).ask()
    indicators = [p.x[:10] for p in proposals]
    assert all(set(x.tolist()) <= {0.0, 1.0} for x in indicators)
    assert len({tuple(x) for x in indicators}) > 1


def test_the_start_point_is_the_embedding_source_path_and_cmaes_explores_around_it(sources):
    # Sources of 2 and 3 layers, 2 repeats, embedding from m1: the start turns on m1's three layers of
    # repeat 0 (slots 2, 3, 4) and nothing else; scales in [0.5, 2.5] start at 1 = 0.5 + 0.25 * 2.
    genome = DataFlowGenome(
        sources=sources[:2],
        layer_counts=[2, 3],
        embedding_source=1,
        repeats=2,
        scale_range=[0.5, 2.5],
        start="embedding_source",
    )
    start = genome.space.start
    assert start.tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0.25, 0.25]
    assert genome.to_recipe(start).path == tuple(PathStep(source=1, layer=i, scale=1.0) for i in range(3))
    assert DataFlowGenome(sources=sources[:2], layer_counts=[2, 3], repeats=2).space.start is None

    # A step of 0.1 keeps every indicator on its side of 0.5 (pycma's bound transform folds the draws
    # that leave the box back in), so the first generation is the start path itself; 0.4 moves off it.
    near = CMAESOptimizer(space=genome.space, n_objectives=1, seed=0, sigma0=0.1).ask()
    assert all(genome.to_recipe(p.x).path == genome.to_recipe(start).path for p in near)
    wide = CMAESOptimizer(space=genome.space, n_objectives=1, seed=0, sigma0=0.4).ask()
    assert any(genome.to_recipe(p.x).path != genome.to_recipe(start).path for p in wide)

    with pytest.raises(EvomergeError, match="optimizer=cmaes"):
        TPEOptimizer(space=genome.space, n_objectives=1, seed=0)
    with pytest.raises(EvomergeError, match="genome.start"):
        DataFlowGenome(sources=sources[:2], layer_counts=[2, 3], start="base")


def test_recipes_round_trip_and_dispatch_on_kind(sources):
    original = recipe(sources, (0, 0, 1.0), (2, 1, 1.5), cap=4)
    plain = yaml.safe_load(original.to_yaml())
    assert recipe_from_plain(plain) == original and original.canonical() == recipe_from_plain(plain).canonical()
    assert isinstance(recipe_from_plain({"method": "linear", "models": [{"model": "a"}]}), Recipe)
    with pytest.raises(EvomergeError, match="unknown key"):
        DataFlowRecipe.from_plain({**plain, "paths": []})
    with pytest.raises(EvomergeError, match="path\\[0\\]"):
        DataFlowRecipe.from_plain({**plain, "path": [{"source": 0}]})


def test_the_passthrough_config_opens_and_closes_with_the_embedding_source(sources):
    stack = recipe(sources, (0, 0, 1.0), (0, 1, 1.0), (2, 2, 1.0), (0, 0, 1.0))
    assert to_passthrough(stack)["slices"] == [
        {"sources": [{"model": sources[1], "layer_range": [0, 0]}]},  # embeddings from math
        {"sources": [{"model": sources[0], "layer_range": [0, 2]}]},
        {"sources": [{"model": sources[2], "layer_range": [2, 3]}]},
        {"sources": [{"model": sources[0], "layer_range": [0, 1]}]},
        {"sources": [{"model": sources[1], "layer_range": [0, 0]}]},  # final norm and head from math
    ]
    with pytest.raises(ValueError):
        to_passthrough(recipe(sources, (0, 0, 1.1)))


def test_the_decoder_layer_still_takes_its_cache_by_a_known_name():
    # PathLayer re-files the KV cache a model hands its decoder layers under the layer's path position,
    # looking for it under one of CACHE_ARGUMENTS. A release that renames the argument again would
    # bypass the re-filing silently (positions sharing a slot): this names the change instead.
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel

    from evomerge.materialize.dataflow import CACHE_ARGUMENTS

    layer_arguments = inspect.signature(LlamaDecoderLayer.forward).parameters
    assert any(name in layer_arguments for name in CACHE_ARGUMENTS), list(layer_arguments)
    assert any(f"{name}={name}" in inspect.getsource(LlamaModel.forward) for name in CACHE_ARGUMENTS)
