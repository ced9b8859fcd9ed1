"""Model Breadcrumbs: drop each task vector's largest outliers and smallest entries, then add
(breadcrumbs) or TIES-merge (breadcrumbs_ties) what remains."""

from __future__ import annotations

import torch

from evomerge.methods.registry import (
    DENSITY,
    GAMMA,
    INT8_MASK,
    LAMBDA,
    NORMALIZE_OFF,
    RESCALE_OFF,
    WEIGHT,
    merge_method,
)
from evomerge.methods.sparsify import magnitude_outliers
from evomerge.methods.task_arithmetic import merge_task_vectors

_REFERENCE = "https://arxiv.org/abs/2312.06795"
_PARAMS = (WEIGHT, DENSITY, GAMMA, NORMALIZE_OFF, RESCALE_OFF, LAMBDA, INT8_MASK)


@merge_method(
    name="breadcrumbs_ties",
    reference=_REFERENCE,
    params=_PARAMS,
    fixed={"sign_consensus": True},
    inputs="deltas",
    needs_base=True,
)
@merge_method(
    name="breadcrumbs",
    reference=_REFERENCE,
    params=_PARAMS,
    fixed={"sign_consensus": False},
    inputs="deltas",
    needs_base=True,
)
def breadcrumbs(
    base: torch.Tensor,
    deltas: torch.Tensor,
    *,
    weight: torch.Tensor,
    density: torch.Tensor,
    gamma: torch.Tensor,
    normalize: bool,
    rescale: bool,
    lambda_: float,
    int8_mask: bool,  # how mergekit stores its mask; no numeric effect (see sign_consensus)
    sign_consensus: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023, https://arxiv.org/abs/2312.06795), summed or TIES-elected."""
    kept = torch.empty_like(deltas)
    for delta, keep, outliers, crumbs in zip(deltas, density.tolist(), gamma.tolist(), kept, strict=True):
        magnitude_outliers(delta, keep, outliers, crumbs, rescale=rescale)
    return merge_task_vectors(
        base, kept, weight, normalize=normalize, lambda_=lambda_, sign_consensus=sign_consensus, out=out
    )
