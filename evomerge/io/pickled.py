"""``pytorch_model.bin`` weights (one file, or shards named by ``pytorch_model.bin.index.json``), read in place.

A ``.bin`` file is a pickle, and unpickling can run arbitrary code. torch's weights-only unpickler
accepts tensors and plain containers and nothing that calls a function; from torch 2.6 on it is
also fixed against the bypass of CVE-2025-32434, the version transformers requires for the same
load. So evomerge reads these files with ``torch.load(weights_only=True, mmap=True)`` on torch >= 2.6
and refuses them on older torch.

Why read them rather than convert them once into cached safetensors: a conversion doubles the disk
a model takes (28 GB more for a 7B model in fp32) and needs a cache that must notice when its
source changes; the read costs nothing up front, memory-maps the file as safetensors are, and reads
the very tensors transformers' own ``from_pretrained`` reads when a worker loads the same folder.
What is lost is the positioned-read fast path of ``Checkpoint.read_into`` (a ``.bin`` tensor is
copied out of the map, whose touched pages count in the process's resident set until the checkpoint
is closed): safetensors stay the faster format, ``.bin`` the one that works.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from evomerge.errors import EvomergeError

SAFE_TORCH = (2, 6)
# torch's refusal is a page of advice (including "retry with weights_only=False"); its one useful line is this.
_REFUSAL = re.compile(r"WeightsUnpickler error:\s*([^\n]+?)(?:\. |\n|$)")


def load_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """The name → tensor map in ``file``, memory-mapped (its data is read when a tensor is used)."""
    if torch.__version__ < SAFE_TORCH:
        raise EvomergeError(
            f"'{file}' holds .bin (pickle) weights, and torch {torch.__version__} cannot load them safely: "
            "before torch 2.6 even a weights-only load could run code hidden in the file (CVE-2025-32434)",
            "install torch >= 2.6, or convert the folder to safetensors once on a machine you trust "
            "(transformers: from_pretrained, then save_pretrained)",
        )
    try:
        # Files from torch < 1.6 are not zip archives and cannot be memory-mapped; they are read whole.
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as error:
        found = _REFUSAL.search(str(error))
        raise EvomergeError(
            f"'{file}' cannot be read as plain tensors: the weights-only load stops at "
            f"'{found[1] if found else 'an unreadable record'}' (the file is corrupt, or holds objects that could "
            "run code when loaded)",
            "download it again, or use the model's safetensors weights; a .bin saved from a state dict "
            "(torch.save(model.state_dict())) loads",
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise EvomergeError(
            f"weights file '{file}' is truncated or corrupt ({str(error).splitlines()[0].split('. ')[0]})",
            "download or copy that file again; its size should match the source",
        ) from error
    if not isinstance(state, dict) or not all(
        isinstance(name, str) and isinstance(tensor, torch.Tensor) for name, tensor in state.items()
    ):
        raise EvomergeError(
            f"'{file}' does not hold a state dict (tensor names mapped to tensors)",
            "point to a model folder saved by transformers (its pytorch_model*.bin hold state dicts)",
        )
    return state
