"""TIES-Merging: trim each task vector to its largest entries, elect a sign per entry, merge the agreeing."""

from __future__ import annotations

import torch

from evomerge.methods.registry import (
    DENSITY,
    INT8_MASK,
    LAMBDA,
    NORMALIZE_ON,
    RESCALE_OFF,
    WEIGHT,
    merge_method,
)
from evomerge.methods.sparsify import magnitude
from evomerge.methods.task_arithmetic import merge_task_vectors


@merge_method(
    name="ties",
    reference="https://arxiv.org/abs/2306.01708",
    params=(WEIGHT, DENSITY, NORMALIZE_ON, RESCALE_OFF, LAMBDA, INT8_MASK),
    inputs="deltas",
    needs_base=True,
)
def ties(
    base: torch.Tensor,
    deltas: torch.Tensor,
    *,
    weight: torch.Tensor,
    density: torch.Tensor,
    normalize: bool,
    rescale: bool,
    lambda_: float,
    int8_mask: bool,  # how mergekit stores its mask; no numeric effect (see sign_consensus)
) -> torch.Tensor:
    """TIES-Merging: resolving interference when merging models (Yadav et al. 2023, https://arxiv.org/abs/2306.01708)."""
    trimmed = torch.empty_like(deltas)
    for delta, keep, out in zip(deltas, density.tolist(), trimmed, strict=True):
        magnitude(delta, keep, out, rescale=rescale)
    return merge_task_vectors(base, trimmed, weight, normalize=normalize, lambda_=lambda_, sign_consensus=True)
