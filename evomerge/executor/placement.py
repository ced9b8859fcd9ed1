"""Where one worker's model lives when it spans several devices (``executor.gpus_per_worker``).

Pipeline placement, as accelerate's device maps express it: the decoder layers in contiguous blocks, one
block per device, balanced by bytes; the embeddings with the first block, the final norm and the LM head
with the last (a tied head stays with the embeddings it is). Each tensor is then merged on the device
that holds it (materialize/in_place.py), so no source crosses between devices.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from evomerge.io.checkpoint import Checkpoint

_LAYER = re.compile(r"^(.*\blayers\.\d+)\.")


def module_of(tensor_name: str) -> str:
    """The module a device map places a tensor by: its decoder layer, else the module that owns it."""
    layer = _LAYER.match(tensor_name)
    return layer.group(1) if layer else tensor_name.rpartition(".")[0]


def place_modules(sizes: dict[str, int], devices: Sequence[str], *, tied_head: bool = False) -> dict[str, str]:
    """An accelerate device map for modules of ``sizes`` (bytes, in the model's order: embeddings, layers,
    norm, head). Layers go to device ``floor(N * midpoint / total)``, where ``midpoint`` is the bytes before
    the layer plus half its own: contiguous blocks, each within a layer of ``total / N``."""
    if not devices:
        raise ValueError("place_modules needs at least one device")
    layers = [name for name in sizes if _LAYER.match(name + ".")]
    if not layers:
        return dict.fromkeys(sizes, devices[0])
    first, last = list(sizes).index(layers[0]), list(sizes).index(layers[-1])
    total, before, placement = sum(sizes.values()), 0, {}
    for index, (name, size) in enumerate(sizes.items()):
        if index < first:
            placement[name] = devices[0]
        elif index > last:
            placement[name] = devices[-1]
        else:
            placement[name] = devices[min(len(devices) - 1, math.floor(len(devices) * (before + size / 2) / total))]
        before += size
    if tied_head and "lm_head" in placement:
        placement["lm_head"] = placement[module_of("model.embed_tokens.weight")]
    return placement


def device_map(checkpoint: Checkpoint, devices: Sequence[str], *, itemsize: int) -> dict[str, str]:
    """``place_modules`` for a checkpoint's tensors at ``itemsize`` bytes an entry."""
    sizes: dict[str, int] = {}
    for name in checkpoint.names:
        module = module_of(name)
        sizes[module] = sizes.get(module, 0) + math.prod(checkpoint.shape(name)) * itemsize
    tied = bool(checkpoint.config.get("tie_word_embeddings")) and "lm_head.weight" not in checkpoint.names
    if tied:
        sizes.setdefault("lm_head", 0)
    return place_modules({name: sizes[name] for name in sorted(sizes, key=_model_order)}, devices, tied_head=tied)


def _model_order(module: str) -> tuple[int, int]:
    """Embeddings, then the layers by index (names sort layers.10 before layers.2), then the rest, the head last."""
    layer = _LAYER.match(module + ".")
    if layer:
        return 1, int(module.rpartition(".")[2])
    return (3, 0) if module == "lm_head" else ((0, 0) if "embed" in module else (2, 0))
