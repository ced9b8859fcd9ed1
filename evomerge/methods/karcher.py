"""Karcher mean: the Riemannian (Fréchet) mean of the models' directions on the unit hypersphere, by
fixed-point iteration, scaled by their mean norm; every model weighs the same, as in mergekit 0.1.5.

Like mergekit's, it merges every input alike: a mergekit config's ``base_model`` is one more input
there, so a recipe that mirrors one lists the base among ``models``.
"""

from __future__ import annotations

import torch

from evomerge.methods.registry import Param, merge_method, written

MAX_ITER = Param("max_iter", per_model=False, default=10, kind=int, low=0)
# Below this a norm, an angle or a step counts as zero: inputs with smaller norms take no part in the
# direction (they still count in the scale), and the iteration stops.
TOL = Param("tol", per_model=False, default=1e-5, low=0.0)


@merge_method(
    name="karcher",
    reference="https://arxiv.org/abs/2603.04972",
    params=(MAX_ITER, TOL),
    inputs="tensors",
    needs_base=False,
)
def karcher(
    base: torch.Tensor | None,
    tensors: torch.Tensor,
    *,
    max_iter: int,
    tol: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Karcher-mean merging (https://arxiv.org/abs/2603.04972)."""
    count = tensors.shape[0]
    if count == 1:
        return tensors[0].clone() if out is None else out.copy_(tensors[0])
    # 16-bit inputs merge in float32 and are rounded once, at the end.
    work = torch.float64 if tensors.dtype == torch.float64 else torch.float32
    flat = tensors.reshape(count, -1).to(work)
    alphas = [1.0 / count] * count
    norms = [torch.linalg.vector_norm(vector) for vector in flat]
    units = [torch.zeros_like(v) if n.item() == 0.0 else v / n for v, n in zip(flat, norms, strict=True)]
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return written(torch.zeros_like(tensors[0]), out)
    share = [alphas[i] / sum(alphas[j] for j in valid) for i in valid]
    units = [units[i] for i in valid]

    mean = torch.zeros_like(units[0])
    for alpha, unit in zip(share, units, strict=True):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(int(max_iter)):
        # The weighted mean of the log maps at ``mean``, then one exponential-map step along it.
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(share, units, strict=True):
            dot = torch.clamp(torch.dot(mean, unit), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        step = torch.linalg.vector_norm(tangent)
        if step.item() < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    # Every input's norm counts in the scale, also those too small to have a direction.
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms, strict=True))
    return written((scale * mean).view(tensors.shape[1:]).to(tensors.dtype), out)
