"""The device memory a worker keeps free for scoring: one batch's KV cache, activations and logits.

Sized from the lengths of the tasks' real requests (evaluate/request_lengths.py), lm-eval's full length where
a length is unknown; on a model placed across several GPUs, each part sits on the GPU that holds it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from evomerge.dtypes import torch_dtype
from evomerge.executor.placement import module_of
from evomerge.materialize.sources import HEAD

Parts = dict[str, int]


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=torch_dtype(dtype)).element_size()


def lm_eval_length(config: dict, max_length: int | None) -> int:
    """The tokens lm-eval cuts a request to: ``tasks.model_args.max_length``, else the model's context (lm-eval
    0.4's ``resolve_max_length``; 2,048 where the config names none)."""
    return max_length or int(config.get("max_position_embeddings") or 2048)


def reserve_parts(
    config: dict, *, dtype: str, batch_size: int | str, length: int, logits_length: int | None = None
) -> Parts:
    """Bytes for scoring one batch of ``batch_size`` requests of ``length`` tokens: the KV cache, one layer's
    activations, and the logits with their log-softmax (lm-eval's, float32 at most) of every position, or of
    ``logits_length`` positions (generation keeps the last one's). ``batch_size=auto`` counts one request:
    lm-eval then sizes its batches to the memory left, so set ``executor.reserve_bytes`` if scoring needs more."""
    itemsize = _itemsize(dtype)
    batch = batch_size if isinstance(batch_size, int) else 1
    hidden, layers = int(config.get("hidden_size") or 0), int(config.get("num_hidden_layers") or 0)
    heads = int(config.get("num_attention_heads") or 1)
    head_dim = int(config.get("head_dim") or hidden // heads)  # a config may hold head_dim: null
    kv_heads = int(config.get("num_key_value_heads") or heads)
    intermediate = int(config.get("intermediate_size") or 4 * hidden)
    tokens = batch * length
    positions = batch * (length if logits_length is None else logits_length)
    return {
        "KV cache": 2 * layers * kv_heads * head_dim * tokens * itemsize,
        "logits": positions * int(config.get("vocab_size") or 0) * (itemsize + 4),
        "activations": tokens * (4 * hidden + 2 * intermediate) * itemsize,
    }


def default_reserve(config: dict, *, dtype: str, batch_size: int | str, max_length: int | None) -> int:
    """``reserve_parts`` in all, for requests of lm-eval's full length: the worst case."""
    length = lm_eval_length(config, max_length)
    return sum(reserve_parts(config, dtype=dtype, batch_size=batch_size, length=length).values())


def requests_reserve(
    config: dict, *, dtype: str, batch_size: int | str, max_length: int | None, scored: int | None, generated: int
) -> Parts:
    """``reserve_parts`` for the longest requests the tasks send (evaluate/request_lengths.py), each cut to
    lm-eval's length: the larger of a batch of scored requests (every position's logits) and a batch of
    generations (the last position's). ``scored`` None (a length unknown): full-length requests."""
    cap = lm_eval_length(config, max_length)
    common = dict(dtype=dtype, batch_size=batch_size)
    kinds = [reserve_parts(config, **common, length=cap if scored is None else min(scored, cap))]
    if generated:
        kinds.append(reserve_parts(config, **common, length=min(generated, cap), logits_length=1))
    return {part: max(kind[part] for kind in kinds) for part in kinds[0]}


def reserve_on_devices(reserve: int | Parts, placement: Mapping[str, str], names: Sequence[str]) -> dict[str, int]:
    """Each device's part of the reserve. The KV cache sits with its layers (split by their count), one
    layer's activations on each device that runs layers, the logits on the device of the head (a tied head
    is the embedding). A reserve given as one number (``executor.reserve_bytes``) is kept on every device."""
    devices = list(dict.fromkeys(placement.values()))
    if isinstance(reserve, int):
        return dict.fromkeys(devices, reserve)
    layers = [placement[m] for m in dict.fromkeys(module_of(n) for n in names) if m.split(".")[-1].isdigit()]
    head = placement[module_of(HEAD if HEAD in names else "model.embed_tokens.weight")]
    share = dict.fromkeys(devices, 0)
    for device in devices:
        count = layers.count(device)
        share[device] += reserve.get("KV cache", 0) * count // max(len(layers), 1)
        share[device] += reserve.get("activations", 0) if count or len(devices) == 1 else 0
    share[head] += reserve.get("logits", 0)
    return share
