"""A data-flow candidate as a real transformers causal LM whose decoder layers are the sources' own modules.

The sources stay loaded once; each candidate only rebuilds the list of layers the hidden state runs
through (no weight is copied, a layer used twice is one module). What makes that a correct model:

* Position: the rotary embedding is computed once per forward from the positions and handed to every
  layer, exactly as in the source models, so a layer sees the same positions wherever it sits.
* KV cache: attention writes its keys and values to ``cache.update(..., self.layer_idx)``, and a layer
  used at two positions has one ``layer_idx``. Each position therefore hands its layer a view of the
  cache that files the update under the position instead (``PositionCache``), so every position has
  its own slot and ``generate`` with a cache equals decoding without one.
* Per-layer attributes: a layer keeps its kind where it lands. A family whose layers differ (sliding or
  full attention) lists them in its config (``layer_types``); the routed config gets the list of the
  path's layers (``per_layer_values``), from which the model picks each position's mask and rotary
  table and the cache each position's kind of slot.
* Scaling: a position multiplies the hidden state by its step's scale before running its layer.

The families are declared in ``FAMILIES``; all lay their causal LM out as Llama does
(``model.embed_tokens``, ``model.layers``, ``model.norm``, ``model.rotary_emb``, ``lm_head``).

transformers internals this module relies on (checked on 5.17 and 5.25; the family-by-family tests in
tests/test_dataflow_architectures.py fail when one changes): those module names; a decoder layer is
handed its KV cache as a keyword (``CACHE_ARGUMENTS``) and touches it only through
``cache.update(k, v, layer_idx, ...)``; the model's forward runs ``layers[:config.num_hidden_layers]``
and picks position i's mask (Gemma 3: also its rotary table) by ``config.layer_types[i]`` (4.5x: by
``decoder_layer.attention_type``, see ``LAYER_ATTRIBUTES``); ``DynamicCache(config=...)`` gives
position i a sliding-window slot by ``config.layer_types[i]``; Qwen2 and Qwen3 build the sliding mask
only if ``model.has_sliding_layers``; Gemma 3's ``rotary_emb`` has a table for each layer type of
its own config.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from evomerge.errors import EvomergeError
from evomerge.io.checkpoint import Checkpoint
from evomerge.recipe.dataflow import DataFlowRecipe, PathStep

# Config keys every source must share: one config (and one rotary embedding) then describes every
# layer of a path, in the search and in the exported model. Layer counts and vocabularies may differ
# (embeddings and head come from one source).
_MUST_MATCH = (
    "hidden_size",
    "model_type",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "hidden_act",
    "rms_norm_eps",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
    "mlp_bias",
)


@dataclass(frozen=True)
class Family:
    """What a data-flow path needs to know about one model family (mergekit's architecture JSON, for paths)."""

    must_match: tuple[str, ...] = ()  # config keys, beyond _MUST_MATCH, that one config states for every layer
    per_layer: tuple[str, ...] = ()  # config lists with one entry per decoder layer: each entry follows its layer
    rotary_per_layer_type: bool = False  # one rotary table per layer type, all in the embedding source's rotary_emb


# Layer-internal settings (soft-capping, the attention scale) must match too: the exported model has one config.
_GEMMA = ("sliding_window", "query_pre_attn_scalar", "attn_logit_softcapping", "hidden_activation")
FAMILIES = {
    "llama": Family(),
    "mistral": Family(must_match=("sliding_window",)),  # one window for every layer, or none
    "qwen2": Family(must_match=("sliding_window",), per_layer=("layer_types",)),
    "qwen3": Family(must_match=("sliding_window",), per_layer=("layer_types",)),
    "gemma2": Family(must_match=_GEMMA, per_layer=("layer_types",)),
    "gemma3_text": Family(
        must_match=(*_GEMMA, "rope_local_base_freq", "use_bidirectional_attention"),
        per_layer=("layer_types",),
        rotary_per_layer_type=True,
    ),
    # Phi-3's LongRoPE switches from its short to its long factors past original_max_position_embeddings.
    "phi3": Family(must_match=("sliding_window", "original_max_position_embeddings")),
}


def family_of(model_type: str) -> Family:
    """The declaration of a model family; say which families exist otherwise."""
    family = FAMILIES.get(model_type)
    if family is None:
        raise EvomergeError(
            f"data-flow merging does not know the model family '{model_type}'",
            f"use sources of one of {sorted(FAMILIES)}, or declare the family in "
            "evomerge/materialize/dataflow.py's FAMILIES (what its config lists per layer)",
        )
    return family


def source_configs(paths: Sequence[str | Path]) -> list:
    """The sources' configs as transformers resolves them (derived fields such as ``layer_types`` filled in)."""
    from transformers import AutoConfig

    return [AutoConfig.from_pretrained(path) for path in paths]


def open_sources(paths: Sequence[str], *, role: str = "data-flow source") -> list[Checkpoint]:
    """Open the sources and check that their layers can follow one another; say why not otherwise
    (``role``: what the error calls a source)."""
    checkpoints = [Checkpoint.open(path) for path in paths]
    for checkpoint in checkpoints:
        family_of(checkpoint.config.get("model_type"))
    configs = source_configs([checkpoint.path for checkpoint in checkpoints])
    reference = configs[0]
    for checkpoint, other in zip(checkpoints[1:], configs[1:], strict=True):
        for key in (*_MUST_MATCH, *family_of(reference.model_type).must_match):
            mine, theirs = getattr(reference, key, None), getattr(other, key, None)
            if mine != theirs:
                raise EvomergeError(
                    f"{role} '{checkpoint.path}' has {key} = {theirs} but '{checkpoints[0].path}' has "
                    f"{key} = {mine}, so the hidden state of one cannot flow through the layers of the other",
                    "use sources of one architecture and width (their layer counts may differ)",
                )
    return checkpoints


def per_layer_values(configs: Sequence, path: Sequence[PathStep]) -> dict[str, list]:
    """The config lists of a model built from ``path``: each position gets the entry of the layer it runs."""
    family = family_of(configs[0].model_type)
    return {key: [getattr(configs[step.source], key)[step.layer] for step in path] for key in family.per_layer}


class PositionCache:
    """The cache as one path position sees it: its layer's update is filed under the position.

    Only ``update`` is offered: an architecture that reads the cache any other way inside a layer
    fails loudly here instead of sharing a slot between positions.
    """

    def __init__(self, *, cache, position: int) -> None:
        self.cache = cache
        self.position = position

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.cache.update(key_states, value_states, self.position, *args, **kwargs)


class PathLayer(nn.Module):
    """One position of the path: scale the hidden state, then run a source's decoder layer (not a copy)."""

    def __init__(self, *, layer: nn.Module, position: int, scale: float) -> None:
        super().__init__()
        self.layer = layer
        self.position = position
        self.scale = scale
        for name in LAYER_ATTRIBUTES:
            if hasattr(layer, name):
                setattr(self, name, getattr(layer, name))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.scale != 1.0:
            hidden_states = hidden_states * self.scale
        name = cache_argument(kwargs)
        if name is not None:
            kwargs[name] = PositionCache(cache=kwargs[name], position=self.position)
        return self.layer(hidden_states, *args, **kwargs)


# What a model's forward reads from its decoder layers themselves: transformers 4.5x picked a layer's mask
# by ``decoder_layer.attention_type`` (Qwen2, Qwen3, Gemma 2 and 3); 5.x reads ``config.layer_types[i]``
# instead, which ``materialize`` sets. A layer's own attribute follows it wherever it sits.
LAYER_ATTRIBUTES = ("attention_type",)


# transformers < 5.24 hands a decoder layer its KV cache as ``past_key_values``; 5.24 renamed it ``cache``
# (the old name is accepted until 5.40). Whichever name the model used is the one passed on.
# tests/test_dataflow_architectures.py::test_every_family_still_hands_its_decoder_layers_the_cache_by_a_known_name
# fails when it changes.
CACHE_ARGUMENTS = ("cache", "past_key_values")


def cache_argument(kwargs: dict) -> str | None:
    """The name under which the model handed its decoder layer a KV cache, or None without one."""
    return next((name for name in CACHE_ARGUMENTS if kwargs.get(name) is not None), None)


class DataFlowRouter:
    """Holds the sources; ``model`` is one causal LM re-routed through their layers per candidate."""

    def __init__(self, *, sources: Sequence[nn.Module], source_paths: Sequence[str], embedding_source: int) -> None:
        ends = sources[embedding_source]
        config = copy.deepcopy(ends.config)
        family = family_of(config.model_type)
        with torch.device("meta"):
            model = type(ends)(config)  # a shell: every module in it is replaced by a source's below
        model.model.embed_tokens = ends.model.embed_tokens
        model.model.norm = ends.model.norm
        model.model.rotary_emb = ends.model.rotary_emb
        model.lm_head = ends.lm_head
        model.model.layers = nn.ModuleList()
        if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
            raise EvomergeError(
                f"'{source_paths[embedding_source]}' ({config.model_type}) keeps weights outside the modules a "
                "data-flow model takes from its sources (embed_tokens, layers, norm, rotary_emb, lm_head)",
                "use sources of a family laid out as Llama is (see FAMILIES in evomerge/materialize/dataflow.py)",
            )
        if family.rotary_per_layer_type:
            missing = {kind for source in sources for kind in source.config.layer_types} - set(config.layer_types)
            if missing:
                raise EvomergeError(
                    f"the embedding source '{source_paths[embedding_source]}' has no layer of type {sorted(missing)}, "
                    "so its rotary embedding has no table for the other sources' layers of that type",
                    "choose an embedding source that has every layer type of the sources",
                )
        model.generation_config = ends.generation_config
        self.model = model.eval()
        self.source_paths = tuple(source_paths)
        self.embedding_source = embedding_source
        self.configs = [source.config for source in sources]
        self.layers = [list(source.model.layers) for source in sources]

    @classmethod
    def load(cls, template: DataFlowRecipe, *, device: torch.device, dtype: torch.dtype) -> DataFlowRouter:
        from transformers import AutoModelForCausalLM

        checkpoints = open_sources(template.sources)  # hub IDs resolved to their cached folders
        sources = [
            AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=dtype).to(device).eval()
            for checkpoint in checkpoints
        ]
        return cls(sources=sources, source_paths=template.sources, embedding_source=template.embedding_source)

    @property
    def layer_counts(self) -> list[int]:
        return [len(layers) for layers in self.layers]

    def materialize(self, recipe: DataFlowRecipe) -> None:
        """Route ``model`` through ``recipe``'s path (refused, leaving the model as it was, if invalid)."""
        if recipe.sources != self.source_paths or recipe.embedding_source != self.embedding_source:
            raise EvomergeError(
                "the candidate's sources (or embedding source) are not the ones this model holds",
                "build a new DataFlowRouter for those sources",
            )
        recipe.check(self.layer_counts)
        config = self.model.config
        self.model.model.layers = nn.ModuleList(
            PathLayer(layer=self.layers[step.source][step.layer], position=position, scale=step.scale)
            for position, step in enumerate(recipe.path)
        )
        # The forward runs layers[:num_hidden_layers] and picks position i's mask (and, for Gemma 3, rotary
        # table) by config.layer_types[i]; generate sizes its cache from both.
        config.num_hidden_layers = len(recipe.path)
        for key, values in per_layer_values(self.configs, recipe.path).items():
            setattr(config, key, values)
        if hasattr(self.model.model, "has_sliding_layers"):
            # Qwen2 and Qwen3 (transformers 5.x) build the sliding-window mask only if __init__ saw a sliding layer.
            self.model.model.has_sliding_layers = "sliding_attention" in config.layer_types
