"""NuSLERP: spherical interpolation between two models (or, given a base, their task vectors), over the
whole tensor or row by row, at ``t = w_1 / (w_0 + w_1)``, as mergekit 0.1.5 computes it."""

from __future__ import annotations

import torch

from evomerge.methods.registry import WEIGHT, Param, merge_method, written

# Interpolate along dim 0 (one slerp per column) instead of the last dim; flatten (the default) makes
# the whole tensor one vector and overrides it.
ROW_WISE = Param("nuslerp_row_wise", per_model=False, default=False, kind=bool)
FLATTEN = Param("nuslerp_flatten", per_model=False, default=True, kind=bool)
# mergekit's constants: norms are clamped to at least _NORM_FLOOR before normalising; 1 - cos^2 at or
# below _COLINEAR_EPS^2 falls back to linear interpolation (sin(theta) would vanish); weights summing
# to less than _ZERO_WEIGHTS in magnitude give t = 1/2.
_NORM_FLOOR = 1e-7
_COLINEAR_EPS = 1e-8
_ZERO_WEIGHTS = 1e-6


def nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool) -> torch.Tensor:
    """Slerp from ``v0`` (t = 0) to ``v1`` (t = 1) along the last dim (``row_wise``: dim 0; ``flatten``:
    the whole tensor), the angle taken between the normalised vectors and applied to the raw ones."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=_NORM_FLOOR)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=_NORM_FLOOR)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= _COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


@merge_method(
    name="nuslerp",
    reference="https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/nuslerp.py",
    params=(WEIGHT, ROW_WISE, FLATTEN),
    inputs="tensors",
    needs_base=False,
    optional_base=True,
    min_models=2,
    max_models=2,
)
def nuslerp(
    base: torch.Tensor | None,
    tensors: torch.Tensor,
    *,
    weight: torch.Tensor,
    nuslerp_row_wise: bool,
    nuslerp_flatten: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """NuSLERP as mergekit defines it (https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/nuslerp.py)."""
    first, second = weight.tolist()
    total = first + second
    t = 0.5 if abs(total) < _ZERO_WEIGHTS else second / total
    # 16-bit inputs merge in float32 and are rounded once, at the end.
    work = torch.float64 if tensors.dtype == torch.float64 else torch.float32
    v0, v1 = tensors[0].to(work), tensors[1].to(work)
    if base is None:
        return written(
            nuslerp_vectors(t, v0, v1, row_wise=nuslerp_row_wise, flatten=nuslerp_flatten).to(tensors.dtype), out
        )
    origin = base.to(work)
    moved = nuslerp_vectors(t, v0 - origin, v1 - origin, row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)
    return written((origin + moved).to(tensors.dtype), out)
