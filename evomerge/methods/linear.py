"""Linear merge (model soups): a weighted average of the models' own tensors; no base model involved.

mergekit treats a configured ``base_model`` as one more input here (it adds it to the inputs and
expects a weight for it), so a caller that mirrors such a config stacks the base among ``tensors``.
"""

from __future__ import annotations

import torch

from evomerge.methods.registry import NORMALIZE_ON, WEIGHT, merge_method


@merge_method(
    name="linear",
    reference="https://arxiv.org/abs/2203.05482",
    params=(WEIGHT, NORMALIZE_ON),
    inputs="tensors",
    needs_base=False,
)
def linear(base: torch.Tensor | None, tensors: torch.Tensor, *, weight: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Model soups (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482)."""
    count = tensors.shape[0]
    # mergekit keeps the weights (and their sum) in float32 even for 16-bit tensors; the normalised
    # coefficients are formed there and rounded once, when the one fused matrix-vector pass takes
    # them in the tensors' dtype (its accumulation is float32 inside the kernel either way).
    coefficients = weight.to(torch.float64 if tensors.dtype == torch.float64 else torch.float32)
    if normalize:
        # As in mergekit, weights summing to 0 are not guarded: the result is then inf/nan.
        coefficients = coefficients / coefficients.sum()
    flat = tensors.reshape(count, -1)
    return torch.mv(flat.T, coefficients.to(tensors.dtype)).view(tensors.shape[1:])
