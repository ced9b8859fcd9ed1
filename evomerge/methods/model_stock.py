"""Model Stock: move from the base toward the average fine-tuned model by a ratio set by the angle
between the task vectors."""

from __future__ import annotations

import torch

from evomerge.methods.registry import FILTER_WISE, merge_method, written

# mergekit's guards: a product of norms is clamped to at least _NORM_FLOOR, and where the ratio's
# denominator 1 + (N-1) cos is within _SINGULAR of 0 the base is kept (t = 0).
_NORM_FLOOR = 1e-6
_SINGULAR = 1e-6


@merge_method(
    name="model_stock",
    reference="https://arxiv.org/abs/2403.19522",
    params=(FILTER_WISE,),
    inputs="deltas",
    needs_base=True,
    min_models=2,
)
def model_stock(
    base: torch.Tensor, deltas: torch.Tensor, *, filter_wise: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Model Stock (Jang et al. 2024, https://arxiv.org/abs/2403.19522): base + t * mean task vector."""
    count = deltas.shape[0]
    # One angle for the whole tensor, or (filter_wise) one per row along the last dimension.
    width = base.shape[-1] if filter_wise and base.ndim >= 1 else max(base.numel(), 1)
    rows = deltas.reshape(count, -1, width)

    # Gram matrices of the task vectors, one per row: [rows, N, N].
    gram = torch.einsum("irc,jrc->rij", rows, rows)
    norms = gram.diagonal(dim1=1, dim2=2).sqrt()
    first, second = torch.triu_indices(count, count, offset=1, device=base.device)
    norm_products = (norms[:, first] * norms[:, second]).clamp(min=_NORM_FLOOR)
    cos = (gram[:, first, second] / norm_products).clamp(-1, 1).mean(dim=1)

    # The paper's t = N cos / (1 + (N - 1) cos), the ratio that puts the merge nearest the center.
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < _SINGULAR
    t = torch.where(singular, 0.0, count * cos / torch.where(singular, 1.0, denominator))

    merged = rows.sum(dim=0).mul_((t / count)[:, None])
    return written(merged.add_(base.reshape(merged.shape)).view(base.shape), out)
