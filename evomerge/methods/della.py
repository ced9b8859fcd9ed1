"""DELLA: drop task-vector entries at random with probabilities ranked by magnitude (MagPrune), rescale,
then TIES-merge (della) or add (della_linear) what remains."""

from __future__ import annotations

import torch

from evomerge.methods.registry import (
    DENSITY,
    EPSILON,
    INT8_MASK,
    LAMBDA,
    NORMALIZE_OFF,
    NORMALIZE_ON,
    RESCALE_ON,
    WEIGHT,
    merge_method,
)
from evomerge.methods.sparsify import della_magprune
from evomerge.methods.task_arithmetic import merge_task_vectors

_REFERENCE = "https://arxiv.org/abs/2406.11617"


@merge_method(
    name="della",
    reference=_REFERENCE,
    params=(WEIGHT, DENSITY, EPSILON, NORMALIZE_ON, RESCALE_ON, LAMBDA, INT8_MASK),
    fixed={"sign_consensus": True},
    inputs="deltas",
    needs_base=True,
    random=True,
)
@merge_method(
    name="della_linear",
    reference=_REFERENCE,
    params=(WEIGHT, DENSITY, EPSILON, NORMALIZE_OFF, RESCALE_ON, LAMBDA, INT8_MASK),
    fixed={"sign_consensus": False},
    inputs="deltas",
    needs_base=True,
    random=True,
)
def della(
    base: torch.Tensor,
    deltas: torch.Tensor,
    *,
    weight: torch.Tensor,
    density: torch.Tensor,
    epsilon: torch.Tensor,
    normalize: bool,
    rescale: bool,
    lambda_: float,
    int8_mask: bool,  # how mergekit stores its mask; no numeric effect (see sign_consensus)
    sign_consensus: bool,
    generator: torch.Generator,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """DELLA-Merging (Deep et al. 2024, https://arxiv.org/abs/2406.11617): MagPrune, then TIES' election or a sum."""
    pruned = torch.empty_like(deltas)
    for delta, keep, spread, prune in zip(deltas, density.tolist(), epsilon.tolist(), pruned, strict=True):
        della_magprune(delta, keep, spread, prune, rescale=rescale, generator=generator)
    return merge_task_vectors(
        base, pruned, weight, normalize=normalize, lambda_=lambda_, sign_consensus=sign_consensus, out=out
    )
