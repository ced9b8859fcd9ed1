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
from evomerge.methods.sparsify import magnitude, magnitude_rank
from evomerge.methods.task_arithmetic import merge_task_vectors


def magnitude_ranks(base: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Each task vector's magnitude ranks ([N, *shape], int32): what trimming needs, whatever the density."""
    return torch.stack([magnitude_rank(delta) for delta in deltas])


@merge_method(
    name="ties",
    reference="https://arxiv.org/abs/2306.01708",
    params=(WEIGHT, DENSITY, NORMALIZE_ON, RESCALE_OFF, LAMBDA, INT8_MASK),
    inputs="deltas",
    needs_base=True,
    precompute=magnitude_ranks,
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
    out: torch.Tensor | None = None,
    precomputed: torch.Tensor | None = None,
) -> torch.Tensor:
    """TIES-Merging: resolving interference when merging models (Yadav et al. 2023, https://arxiv.org/abs/2306.01708)."""
    ranks = precomputed if precomputed is not None else [None] * deltas.shape[0]
    trimmed = torch.empty_like(deltas)
    for delta, keep, rank, trim in zip(deltas, density.tolist(), ranks, trimmed, strict=True):
        magnitude(delta, keep, trim, rescale=rescale, rank=rank)
    return merge_task_vectors(base, trimmed, weight, normalize=normalize, lambda_=lambda_, sign_consensus=True, out=out)
