"""Arcee Fusion: take the model's entry only where its importance (|model - base| times the row's KL
divergence between the softmaxes) is an outlier, above median + 1.5 IQR; elsewhere keep the base."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evomerge.methods.registry import merge_method, written

# mergekit's constants: quantiles of tensors over _SAMPLE entries are estimated from _SAMPLE entries drawn
# with replacement (bounded memory), and _SOFTMAX_EPS keeps the KL divergence's logarithm finite.
_SAMPLE = 1_000_000
_SOFTMAX_EPS = 1e-8
# mergekit draws that sample from torch's global generator, so its thresholds for large tensors change
# from run to run; a fixed seed on the CPU makes this merge a function of its inputs, on any device
# (and mergekit's own draw where its global generator is freshly seeded with it).
_SAMPLE_SEED = 0
_QUARTILES = (0.25, 0.5, 0.75)


def importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|model - base|`` times each row's (last-dim) KL(softmax(model) || softmax(base))."""
    p = F.softmax(model, dim=-1) + _SOFTMAX_EPS
    q = F.softmax(base, dim=-1) + _SOFTMAX_EPS
    return (model - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def outlier_threshold(scores: torch.Tensor) -> torch.Tensor:
    """median + 1.5 (q3 - q1), each quantile the sorted entry at ``int(q * (n - 1))``, of all entries or
    of a sample of ``_SAMPLE``."""
    flat = scores.reshape(-1)
    if flat.numel() > _SAMPLE:
        generator = torch.Generator().manual_seed(_SAMPLE_SEED)
        flat = flat[torch.randint(flat.numel(), (_SAMPLE,), generator=generator).to(flat.device)]
    ordered = torch.sort(flat).values
    q1, median, q3 = ordered[(torch.tensor(_QUARTILES) * (ordered.numel() - 1)).long().to(ordered.device)]
    return median + 1.5 * (q3 - q1)


@merge_method(
    name="arcee_fusion",
    reference="https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/arcee_fusion.py",
    params=(),
    inputs="tensors",
    needs_base=True,
    min_models=1,
    max_models=1,
)
def arcee_fusion(base: torch.Tensor, tensors: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Arcee Fusion as mergekit defines it (https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/arcee_fusion.py)."""
    # 16-bit inputs merge in float32 and are rounded once, at the end (mergekit's float32 mask promotes
    # its result to float32 too; its model writer rounds it to the output dtype).
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    origin, model = base.to(work), tensors[0].to(work)
    scores = importance(model, origin)
    mask = (scores >= outlier_threshold(scores)).to(work)
    return written((origin + (model - origin) * mask).to(base.dtype), out)
