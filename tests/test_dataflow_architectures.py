"""Data-flow merging on every family evomerge declares: tiny random models of each, two sources apiece.

Each family's sources differ in seed and, where the family has per-layer kinds, in which layers slide,
so a layer that keeps its kind at a new position is visible in the logits (the prompt is longer than
the window). The reference runs the named source layers by hand with the mask and rotary table of
each layer's own kind.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from evomerge.errors import EvomergeError
from evomerge.io.checkpoint import Checkpoint
from evomerge.materialize.dataflow import CACHE_ARGUMENTS, FAMILIES, DataFlowRouter, PathLayer
from evomerge.materialize.dataflow_modeling import SCALED_MODELS
from evomerge.materialize.dataflow_to_disk import MODELING_NAME, write_dataflow_model
from evomerge.recipe.dataflow import DataFlowRecipe, PathStep
from tests.families import FAMILIES as ARCHITECTURES
from tests.families import SIZES as SHARED_SIZES
from tests.families import WINDOW

IDS = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11, 12], [1, 20, 21, 22, 23, 24, 25, 26, 27]])
SIZES = dict(
    SHARED_SIZES,
    num_hidden_layers=3,
    initializer_range=0.2,  # larger than a real model's, so that each layer moves the logits visibly
)
SLIDING, FULL = "sliding_attention", "full_attention"
# Which layers slide, per source: a path taking layer 0 of both sources mixes the kinds.
LAYER_TYPES = ([SLIDING, FULL, SLIDING], [FULL, SLIDING, FULL])
EMBEDDING_SOURCE = 1


def config_for(name: str, layer_types: list[str]):
    model_type, extra = ARCHITECTURES[name]
    per_layer = {"layer_types": layer_types} if "layer_types" in FAMILIES[model_type].per_layer else {}
    return AutoConfig.for_model(model_type, **SIZES, **extra, **per_layer)


class World:
    """Two saved sources of one architecture (seeds 0 and 1), loaded once, and a router over them."""

    def __init__(self, name: str, root, layer_types=LAYER_TYPES) -> None:
        self.paths = []
        for seed, types in enumerate(layer_types):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config_for(name, types), dtype=torch.float32)
            model.save_pretrained(root / f"{name}-{seed}")
            self.paths.append(str(root / f"{name}-{seed}"))
        self.models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in self.paths]
        template = DataFlowRecipe(sources=tuple(self.paths), path=(), embedding_source=EMBEDDING_SOURCE)
        self.router = DataFlowRouter.load(template, device=torch.device("cpu"), dtype=torch.float32)

    def recipe(self, *steps) -> DataFlowRecipe:
        path = tuple(PathStep(source=s, layer=layer, scale=scale) for s, layer, scale in steps)
        return DataFlowRecipe(sources=tuple(self.paths), path=path, embedding_source=EMBEDDING_SOURCE, dtype="float32")

    @torch.no_grad()
    def logits(self, *steps, ids=IDS) -> torch.Tensor:
        self.router.materialize(self.recipe(*steps))
        return self.router.model(ids).logits


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def world(request, tmp_path_factory) -> World:
    return World(request.param, tmp_path_factory.mktemp(request.param))


def kind(config, layer: int) -> str:
    """A layer's attention: its entry in layer_types, else the model's one window (Mistral, Phi-3) or none."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return types[layer]
    return SLIDING if getattr(config, "sliding_window", None) else FULL


def additive_mask(length: int, window: int | None) -> torch.Tensor:
    query, key = torch.arange(length)[:, None], torch.arange(length)[None, :]
    allowed = (key <= query) & ((query - key < window) if window else True)
    return torch.zeros(length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


@torch.no_grad()
def by_hand(world: World, steps, ids=IDS) -> torch.Tensor:
    """Embed with the embedding source, run the named layers with their own kind's mask and rotary table, read out."""
    ends = world.models[EMBEDDING_SOURCE]
    hidden = ends.model.embed_tokens(ids)  # Gemma's scaled embedding multiplies by sqrt(hidden_size) itself
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    masks = {SLIDING: additive_mask(ids.shape[1], WINDOW), FULL: additive_mask(ids.shape[1], None)}
    for source, layer, scale in steps:
        layer_kind = kind(world.models[source].config, layer)
        if FAMILIES[ends.config.model_type].rotary_per_layer_type:
            rotary = ends.model.rotary_emb(hidden, positions, layer_kind)  # Gemma 3: local and global tables
        else:
            rotary = ends.model.rotary_emb(hidden, positions)
        hidden = world.models[source].model.layers[layer](
            hidden * scale, attention_mask=masks[layer_kind], position_embeddings=rotary, position_ids=positions
        )
    logits = ends.lm_head(ends.model.norm(hidden))
    cap = getattr(ends.config, "final_logit_softcapping", None)
    return logits if cap is None else cap * torch.tanh(logits / cap)


# Layer 0 of both sources and layer 2 of source 0 twice: five positions through three-layer sources.
LONG = [(0, 0, 1.0), (1, 0, 1.3), (0, 2, 0.8), (0, 2, 1.0), (1, 2, 1.0)]


def test_a_hand_built_path_equals_the_source_layers_run_by_hand(world):
    steps = [(1, 1, 1.0), (0, 0, 1.25), (1, 2, 0.9)]
    logits = world.logits(*steps)
    torch.testing.assert_close(logits, by_hand(world, steps), rtol=0, atol=1e-5)
    swapped = [(0, 1, 1.0), *steps[1:]]
    assert (logits - by_hand(world, swapped)).abs().max() > 1e-3


def test_a_path_longer_than_its_sources_keeps_each_layer_s_kind(world):
    logits = world.logits(*LONG)
    torch.testing.assert_close(logits, by_hand(world, LONG), rtol=0, atol=1e-5)
    config = world.router.model.config
    assert config.num_hidden_layers == 5 and len(world.router.model.model.layers) == 5
    kinds = [kind(world.models[source].config, layer) for source, layer, _ in LONG]
    assert all(isinstance(path_layer, PathLayer) for path_layer in world.router.model.model.layers)
    if "layer_types" in FAMILIES[config.model_type].per_layer:
        assert config.layer_types == kinds
        assert kinds[:2] == [SLIDING, FULL]  # layer 0 slides in source 0, not in source 1
        windows = [path_layer.layer.self_attn.sliding_window for path_layer in world.router.model.model.layers]
        assert windows == [WINDOW if k == SLIDING else None for k in kinds]
    # The cache gives each position the slot of its layer's kind.
    with torch.no_grad():
        cache = world.router.model(IDS, use_cache=True)[1]  # logits, then the cache
    assert [layer.is_sliding for layer in cache.layers] == [k == SLIDING for k in kinds]


@torch.no_grad()
def test_cached_generation_equals_full_recompute_through_a_reused_layer(world):
    world.router.materialize(world.recipe(*LONG))
    model = world.router.model
    prefix = model(IDS[:, :-1], use_cache=True)
    # transformers >= 5.24 takes the cache as `cache=` (and warns on the old name), older as `past_key_values=`.
    name = next(name for name in CACHE_ARGUMENTS if name in inspect.signature(model.forward).parameters)
    step = model(IDS[:, -1:], use_cache=True, **{name: prefix[name]})
    # One token against nine: other matmul shapes, so float32 sums differ in the last bits (Phi-3: ~1e-5).
    torch.testing.assert_close(step.logits[:, -1], model(IDS).logits[:, -1], rtol=1e-5, atol=1e-5)

    generated = model.generate(IDS[:1], max_new_tokens=6, do_sample=False)
    greedy = IDS[:1]
    for _ in range(6):
        next_token = model(greedy, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        greedy = torch.cat([greedy, next_token], dim=1)
    assert torch.equal(generated, greedy)


@torch.no_grad()
@pytest.mark.parametrize("scaled", [False, True], ids=["unit", "scaled"])
def test_the_exported_model_gives_the_search_time_logits(world, scaled, tmp_path):
    steps = LONG if scaled else [(s, layer, 1.0) for s, layer, _ in LONG]
    candidate = world.recipe(*steps)
    out = write_dataflow_model(candidate, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=scaled).eval()
    source_class = type(world.models[0])
    assert type(model) is not source_class if scaled else type(model) is source_class
    assert (out / MODELING_NAME).exists() == scaled
    torch.testing.assert_close(model(IDS).logits, world.logits(*steps), rtol=0, atol=1e-6)
    if "layer_types" in FAMILIES[world.models[0].config.model_type].per_layer:
        assert model.config.layer_types == world.router.model.config.layer_types
    tied = world.models[EMBEDDING_SOURCE].config.tie_word_embeddings
    assert ("lm_head.weight" in Checkpoint.open(out).names) != tied
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied


def test_every_declared_family_exports_scaled_paths():
    assert set(SCALED_MODELS) == set(FAMILIES)


def test_an_undeclared_family_is_refused_with_the_known_ones(tmp_path):
    config = AutoConfig.for_model("olmo2", **SIZES)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "olmo2")
    template = DataFlowRecipe(sources=(str(tmp_path / "olmo2"),), path=())
    with pytest.raises(EvomergeError, match="does not know the model family 'olmo2'.*gemma3_text"):
        DataFlowRouter.load(template, device=torch.device("cpu"), dtype=torch.float32)


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_a_sliding_layer_behind_an_embedding_source_without_one(name, tmp_path):
    # Qwen2 and Qwen3 build the sliding mask only if the model had a sliding layer when it was built.
    world = World(name, tmp_path, layer_types=(LAYER_TYPES[0], [FULL] * 3))
    steps = [(1, 0, 1.0), (0, 0, 1.0), (0, 2, 1.0)]
    torch.testing.assert_close(world.logits(*steps), by_hand(world, steps), rtol=0, atol=1e-5)


def test_gemma3_refuses_an_embedding_source_without_every_layer_type(tmp_path):
    with pytest.raises(EvomergeError, match="has no layer of type \\['sliding_attention'\\]"):
        World("gemma3_text", tmp_path, layer_types=(LAYER_TYPES[0], [FULL] * 3))


def test_a_path_position_shows_the_model_its_layer_s_own_attention_type():
    # transformers 4.5x picked a layer's mask by decoder_layer.attention_type rather than config.layer_types[i].
    layer = torch.nn.Linear(2, 2)
    layer.attention_type = SLIDING
    assert PathLayer(layer=layer, position=3, scale=1.0).attention_type == SLIDING
    assert not hasattr(PathLayer(layer=torch.nn.Linear(2, 2), position=3, scale=1.0), "attention_type")


def test_every_family_still_hands_its_decoder_layers_the_cache_by_a_known_name(world):
    # PathLayer re-files the cache under the path position only if it finds it under one of CACHE_ARGUMENTS.
    model = world.models[0].model
    assert any(name in inspect.signature(type(model.layers[0]).forward).parameters for name in CACHE_ARGUMENTS)
    assert any(f"{name}={name}" in inspect.getsource(type(model).forward) for name in CACHE_ARGUMENTS)
