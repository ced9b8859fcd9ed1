"""DARE: drop each task-vector entry at random and rescale the rest, then add (dare_linear) or
TIES-merge (dare_ties) the sparse task vectors."""

from __future__ import annotations

import torch

from evomerge.methods.registry import (
    DENSITY,
    INT8_MASK,
    LAMBDA,
    NORMALIZE_OFF,
    RESCALE_ON,
    WEIGHT,
    merge_method,
)
from evomerge.methods.sparsify import random_drop
from evomerge.methods.task_arithmetic import merge_task_vectors

_REFERENCE = "https://arxiv.org/abs/2311.03099"


def _drop(deltas: torch.Tensor, density: torch.Tensor, rescale: bool, generator: torch.Generator) -> torch.Tensor:
    dropped = torch.empty_like(deltas)
    for delta, keep, drop in zip(deltas, density.tolist(), dropped, strict=True):
        random_drop(delta, keep, drop, rescale=rescale, generator=generator)
    return dropped


@merge_method(
    name="dare_ties",
    reference=_REFERENCE,
    params=(WEIGHT, DENSITY, NORMALIZE_OFF, RESCALE_ON, LAMBDA, INT8_MASK),
    inputs="deltas",
    needs_base=True,
    random=True,
)
def dare_ties(
    base: torch.Tensor,
    deltas: torch.Tensor,
    *,
    weight: torch.Tensor,
    density: torch.Tensor,
    normalize: bool,
    rescale: bool,
    lambda_: float,
    int8_mask: bool,  # how mergekit stores its mask; no numeric effect (see sign_consensus)
    generator: torch.Generator,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """DARE (Yu et al. 2023, https://arxiv.org/abs/2311.03099) with TIES sign election."""
    dropped = _drop(deltas, density, rescale, generator)
    return merge_task_vectors(base, dropped, weight, normalize=normalize, lambda_=lambda_, sign_consensus=True, out=out)


@merge_method(
    name="dare_linear",
    reference=_REFERENCE,
    params=(WEIGHT, DENSITY, NORMALIZE_OFF, RESCALE_ON, LAMBDA),
    inputs="deltas",
    needs_base=True,
    random=True,
)
def dare_linear(
    base: torch.Tensor,
    deltas: torch.Tensor,
    *,
    weight: torch.Tensor,
    density: torch.Tensor,
    normalize: bool,
    rescale: bool,
    lambda_: float,
    generator: torch.Generator,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """DARE, Language models are Super Mario (Yu et al. 2023, https://arxiv.org/abs/2311.03099)."""
    dropped = _drop(deltas, density, rescale, generator)
    return merge_task_vectors(
        base, dropped, weight, normalize=normalize, lambda_=lambda_, sign_consensus=False, out=out
    )
