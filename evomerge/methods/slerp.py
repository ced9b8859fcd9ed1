"""Spherical linear interpolation between the base tensor and one other model's, over the whole
flattened tensor, as mergekit 0.1.5 computes it."""

from __future__ import annotations

import torch

from evomerge.methods.registry import T, merge_method

# mergekit's constants: norms at or below _NORM_EPS count as 1 (a zero tensor stays finite), and
# |cos| above _COLINEAR falls back to linear interpolation, where sin(theta) would vanish.
_NORM_EPS = 1e-8
_COLINEAR = 0.9995
# Statistics accumulate in float64 and 16-bit inputs merge in float32, a chunk at a time, so the
# working copies stay this small (as in mergekit) instead of doubling the tensors.
_CHUNK = 1 << 20
# Products per block of the statistics: a quarter-million entries keep the three in cache (measured
# fastest on a 12M-entry tensor against 2**16 and 2**20).
_DOT_CHUNK = 1 << 18


def norms_and_dot(base: torch.Tensor, tensors: torch.Tensor) -> torch.Tensor:
    """``[|a|^2, |b|^2, a.b]`` in float64, a chunk at a time: all slerp needs from its inputs besides t.

    The sums accumulate in float64: a float32 dot over a 12M-entry embedding is off by ~5e-5
    relative on CPU, enough to move the merged tensor by 1e-4 (mergekit: 4e-7). The products are
    float32 (exact for 16-bit inputs, rounded by 2**-24 relative for float32 ones, which averages out
    to ~1e-11 over a tensor): four times faster than converting both inputs to float64.
    """
    a, b = base.reshape(-1), tensors[0].reshape(-1)
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    sums = torch.zeros(3, dtype=torch.float64, device=a.device)
    for start in range(0, a.numel(), _DOT_CHUNK):
        x, y = a[start : start + _DOT_CHUNK].to(work), b[start : start + _DOT_CHUNK].to(work)
        products = (torch.mul(x, x), torch.mul(y, y), torch.mul(x, y))
        sums += torch.stack([product.sum(dtype=torch.float64) for product in products])
    return sums


@merge_method(
    name="slerp",
    reference="https://en.wikipedia.org/wiki/Slerp",
    params=(T,),
    inputs="tensors",
    needs_base=True,
    min_models=1,
    max_models=1,
    precompute=norms_and_dot,
)
def slerp(
    base: torch.Tensor,
    tensors: torch.Tensor,
    *,
    t: float,
    out: torch.Tensor | None = None,
    precomputed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Slerp (Shoemake 1985, https://en.wikipedia.org/wiki/Slerp), t=0 gives the base, t=1 the other model."""
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    sums = precomputed if precomputed is not None else norms_and_dot(base, tensors)
    aa, bb, ab = sums.to(work)
    norm_a, norm_b = aa.sqrt(), bb.sqrt()
    norm_a = torch.where(norm_a > _NORM_EPS, norm_a, 1.0)
    norm_b = torch.where(norm_b > _NORM_EPS, norm_b, 1.0)
    cos = (ab / (norm_a * norm_b)).clamp(-1, 1)

    colinear = cos.abs() > _COLINEAR
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    sin_theta = torch.sin(theta)
    # torch.where on device scalars rather than an `if`: no host sync in the inner loop.
    coef_a = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)

    a, b = base.reshape(-1), tensors[0].reshape(-1)
    merged = torch.empty_like(a) if out is None else out.view(-1)
    if base.dtype == work:
        torch.mul(a, coef_a, out=merged).addcmul_(b, coef_b)
        return merged.view(base.shape)
    for start in range(0, a.numel(), _CHUNK):
        span = slice(start, start + _CHUNK)
        merged[span] = (a[span].to(work) * coef_a).addcmul_(b[span].to(work), coef_b)
    return merged.view(base.shape)
