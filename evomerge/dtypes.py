"""The dtypes a merge, a worker's model and an exported folder may use: their names, defined once here."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` → ``torch.bfloat16`` (the names are torch's own attribute names)."""
    import torch  # here, so that reading a config does not import torch

    if name not in DTYPE_NAMES:
        raise KeyError(name)
    return getattr(torch, name)
