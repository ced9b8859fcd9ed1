"""Multi-SLERP: a weighted barycentre of any number of models (or, given a base, their task vectors) on
the hypersphere, through the tangent space at their normalised weighted mean, as mergekit 0.1.5 computes it."""

from __future__ import annotations

import torch

from evomerge.errors import EvomergeError
from evomerge.methods.registry import WEIGHT, Param, merge_method, written

NORMALIZE_WEIGHTS = Param("normalize_weights", per_model=False, default=True, kind=bool)
# Added to each norm before dividing by it (and to the tangent's), and the floor under which the
# weighted mean of the unit vectors counts as zero. Numerical, not a knob to search.
EPS = Param("eps", per_model=False, default=1e-8, low=0.0, low_inclusive=False)


@merge_method(
    name="multislerp",
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    params=(WEIGHT, NORMALIZE_WEIGHTS, EPS),
    inputs="tensors",
    needs_base=False,
    optional_base=True,
)
def multislerp(
    base: torch.Tensor | None,
    tensors: torch.Tensor,
    *,
    weight: torch.Tensor,
    normalize_weights: bool,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-SLERP (Goddard 2025, https://goddard.blog/posts/multislerp-wow-what-a-cool-idea)."""
    if tensors.shape[0] == 1:
        # As in mergekit: one model is returned as it is, whatever its weight.
        return tensors[0].clone() if out is None else out.copy_(tensors[0])
    # 16-bit inputs merge in float32 and are rounded once, at the end.
    work = torch.float64 if tensors.dtype == torch.float64 else torch.float32
    origin = None if base is None else base.to(work)
    points = tensors.to(work) if origin is None else tensors.to(work) - origin
    flat = points.reshape(points.shape[0], -1)
    weights = weight.to(work)
    if normalize_weights:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if points.shape[0] != 2:
            raise EvomergeError(
                "multislerp: the weighted mean of the (task-vector) directions is zero for a tensor, so it has "
                "no direction to interpolate around (antipodal inputs whose weights cancel)",
                "change the weights, or merge these models with another method",
            )
        # mergekit's fallback for two models: linear interpolation.
        merged = (points[0] * weights[0] + points[1] * weights[1]).view(points.shape[1:])
        return written((merged if origin is None else merged + origin).to(tensors.dtype), out)
    mean = mean / mean_norm
    # Project onto the tangent space at the mean, average there, and map back with the exponential map.
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    merged = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    merged = (merged * (norms.squeeze(-1) * weights).sum()).view(points.shape[1:])
    return written((merged if origin is None else merged + origin).to(tensors.dtype), out)
