"""SCE (FuseChat 2.0): select the entries whose task vectors vary most across models, weight each model by
its task vector's mean square, erase entries that disagree with the elected sign, and average the rest."""

from __future__ import annotations

import torch

from evomerge.methods.registry import INT8_MASK, Param, merge_method, written
from evomerge.methods.sign_consensus import elected_sign

# The fraction of entries kept (those of largest variance across the task vectors); 1 keeps all.
SELECT_TOPK = Param("select_topk", per_model=False, default=1.0, low=0.0, high=1.0, search=(0.05, 1.0))
# mergekit's guards: mean squares summing below _WEIGHT_SUM_FLOOR give every model the same weight, and
# the per-entry sum of agreeing weights is clamped to at least _DIVISOR_FLOOR.
_WEIGHT_SUM_FLOOR = 1e-6
_DIVISOR_FLOOR = 1e-6


def select_mask(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """1 at the ``int(nonzero * select_topk)`` entries of largest variance over the models (population
    variance; ``nonzero`` counts the entries where it is not 0), 0 elsewhere; ties go as torch.topk's."""
    if select_topk <= 0:
        return torch.zeros_like(deltas[0])
    if select_topk >= 1:
        return torch.ones_like(deltas[0])
    variance = torch.var(deltas, dim=0, unbiased=False)
    kept = int(torch.count_nonzero(variance) * select_topk)
    mask = torch.zeros_like(variance)
    if kept:
        mask.view(-1)[torch.topk(variance.abs().view(-1), k=kept, largest=True).indices] = 1
    return mask


@merge_method(
    name="sce",
    reference="https://arxiv.org/abs/2408.07990",
    params=(SELECT_TOPK, INT8_MASK),
    inputs="deltas",
    needs_base=True,
)
def sce(
    base: torch.Tensor,
    deltas: torch.Tensor,
    *,
    select_topk: float,
    int8_mask: bool,  # how mergekit stores its masks; no numeric effect (see sign_consensus)
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """SCE merging, FuseChat 2.0 (Wan et al. 2024, https://arxiv.org/abs/2408.07990)."""
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    selected = deltas.to(work) * select_mask(deltas, select_topk).to(work)
    count = selected.shape[0]
    weights = selected.square().reshape(count, -1).mean(dim=1)
    total = weights.sum().item()
    weights = torch.full_like(weights, 1 / count) if abs(total) < _WEIGHT_SUM_FLOOR else weights / total
    weights = weights.view(count, *[1] * (selected.ndim - 1))
    # Zeros have sign 0 and so never agree with the elected sign (+1 where the sum is >= 0, else -1).
    agreeing = weights * (selected.sign() == elected_sign(selected))
    merged = (selected * agreeing).sum(dim=0) / agreeing.sum(dim=0).clamp(min=_DIVISOR_FLOOR)
    return written((base.to(work) + merged).to(base.dtype), out)
