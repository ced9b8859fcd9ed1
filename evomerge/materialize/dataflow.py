"""A data-flow candidate as a real transformers causal LM whose decoder layers are the sources' own modules.

The sources stay loaded once; each candidate only rebuilds the list of layers the hidden state runs
through (no weight is copied, a layer used twice is one module). What makes that a correct model:

* Position: the rotary embedding is computed once per forward from the positions and handed to every
  layer, exactly as in the source models, so a layer sees the same positions wherever it sits.
* KV cache: attention writes its keys and values to ``cache.update(..., self.layer_idx)``, and a layer
  used at two positions has one ``layer_idx``. Each position therefore hands its layer a view of the
  cache that files the update under the position instead (``PositionCache``), so every position has
  its own slot and ``generate`` with a cache equals decoding without one.
* Scaling: a position multiplies the hidden state by its step's scale before running its layer.

Only Llama-style models are supported (``model.embed_tokens``, ``model.layers``, ``model.norm``,
``model.rotary_emb``, ``lm_head``): that is what the toy world and most merge candidates are.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from evomerge.errors import EvomergeError
from evomerge.io.checkpoint import Checkpoint
from evomerge.recipe.dataflow import DataFlowRecipe

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


def open_sources(paths: Sequence[str]) -> list[Checkpoint]:
    """Open the sources and check that their layers can follow one another; say why not otherwise."""
    checkpoints = [Checkpoint.open(path) for path in paths]
    reference = checkpoints[0]
    for other in checkpoints[1:]:
        for key in _MUST_MATCH:
            mine, theirs = reference.config.get(key), other.config.get(key)
            if mine != theirs:
                raise EvomergeError(
                    f"data-flow source '{other.path}' has {key} = {theirs} but '{reference.path}' has {key} = {mine}, "
                    "so the hidden state of one cannot flow through the layers of the other",
                    "use sources of one architecture and width (their layer counts may differ)",
                )
    return checkpoints


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

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.scale != 1.0:
            hidden_states = hidden_states * self.scale
        name = cache_argument(kwargs)
        if name is not None:
            kwargs[name] = PositionCache(cache=kwargs[name], position=self.position)
        return self.layer(hidden_states, *args, **kwargs)


# transformers < 5.24 hands a decoder layer its KV cache as ``past_key_values``; 5.24 renamed it ``cache``
# (the old name is accepted until 5.40). Whichever name the model used is the one passed on.
# tests/test_dataflow.py::test_the_decoder_layer_still_takes_its_cache_by_a_known_name fails when it changes.
CACHE_ARGUMENTS = ("cache", "past_key_values")


def cache_argument(kwargs: dict) -> str | None:
    """The name under which the model handed its decoder layer a KV cache, or None without one."""
    return next((name for name in CACHE_ARGUMENTS if kwargs.get(name) is not None), None)


class DataFlowRouter:
    """Holds the sources; ``model`` is one causal LM re-routed through their layers per candidate."""

    def __init__(self, *, sources: Sequence[nn.Module], source_paths: Sequence[str], embedding_source: int) -> None:
        ends = sources[embedding_source]
        config = copy.deepcopy(ends.config)
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
                "use Llama-style sources (Llama, Mistral, Qwen2 and their fine-tunes)",
            )
        model.generation_config = ends.generation_config
        self.model = model.eval()
        self.source_paths = tuple(source_paths)
        self.embedding_source = embedding_source
        self.layers = [list(source.model.layers) for source in sources]

    @classmethod
    def load(cls, template: DataFlowRecipe, *, device: torch.device, dtype: torch.dtype) -> DataFlowRouter:
        from transformers import AutoModelForCausalLM

        open_sources(template.sources)
        sources = [
            AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval() for path in template.sources
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
        self.model.model.layers = nn.ModuleList(
            PathLayer(layer=self.layers[step.source][step.layer], position=position, scale=step.scale)
            for position, step in enumerate(recipe.path)
        )
        # The forward runs layers[:num_hidden_layers], and generate sizes its cache from it.
        self.model.config.num_hidden_layers = len(recipe.path)
