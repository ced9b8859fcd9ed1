"""Linear merge (model soups): a weighted average of the models' own tensors; no base model involved.

mergekit treats a configured ``base_model`` as one more input here (it adds it to the inputs and
expects a weight for it), so a caller that mirrors such a config stacks the base among ``tensors``.
"""

from __future__ import annotations

import torch

from evomerge.methods.registry import NORMALIZE_ON, WEIGHT, merge_method


def weighted_sum(
    tensors: torch.Tensor, coefficients: torch.Tensor, *, start: torch.Tensor | None, out: torch.Tensor | None
) -> torch.Tensor:
    """``start + sum_i coefficients[i] * tensors[i]`` (no ``start``: the sum alone), into ``out`` if given.

    One fused multiply-add per model, each coefficient a 0-d tensor (no host sync on a GPU): N reads
    of the running sum cost less than a matrix-vector product over the stacked tensors, which runs
    on one thread on CPU and needs a temporary that ``out`` would then copy.
    """
    if out is None:
        out = torch.empty_like(tensors[0])
    if start is None:
        torch.mul(tensors[0], coefficients[0], out=out)
    else:
        torch.addcmul(start, tensors[0], coefficients[0], out=out)
    for tensor, coefficient in zip(tensors[1:], coefficients[1:], strict=True):
        out.addcmul_(tensor, coefficient)
    return out


@merge_method(
    name="linear",
    reference="https://arxiv.org/abs/2203.05482",
    params=(WEIGHT, NORMALIZE_ON),
    inputs="tensors",
    needs_base=False,
)
def linear(
    base: torch.Tensor | None,
    tensors: torch.Tensor,
    *,
    weight: torch.Tensor,
    normalize: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Model soups (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482)."""
    # mergekit keeps the weights (and their sum) in float32 even for 16-bit tensors; the normalised
    # coefficients are formed there and rounded once, to the tensors' dtype.
    coefficients = weight.to(torch.float64 if tensors.dtype == torch.float64 else torch.float32)
    if normalize:
        # As in mergekit, weights summing to 0 are not guarded: the result is then inf/nan.
        coefficients = coefficients / coefficients.sum()
    return weighted_sum(tensors, coefficients.to(tensors.dtype), start=None, out=out)
