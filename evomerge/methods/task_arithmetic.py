"""Task arithmetic, and the weighted sum of task vectors that TIES, DARE, Breadcrumbs and DELLA end with.

mergekit 0.1.5 runs all of these through one routine (its generalized task arithmetic): sparsify each
task vector, multiply by its weight, optionally keep only entries agreeing with the elected sign, sum,
optionally divide by the sum of the (agreeing) weights, multiply by lambda, add to the base.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from evomerge.methods.linear import weighted_sum
from evomerge.methods.registry import LAMBDA, NORMALIZE_OFF, WEIGHT, merge_method
from evomerge.methods.sign_consensus import keep_agreeing_, model_sum

# mergekit leaves the sum unnormalised where the weights cancel (|sum| < 1e-8) instead of dividing by ~0.
_ZERO_WEIGHT_SUM = 1e-8


def merge_task_vectors(
    base: torch.Tensor,
    deltas: torch.Tensor,
    weight: torch.Tensor,
    *,
    normalize: bool,
    lambda_: float,
    sign_consensus: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base + lambda * sum_i w_i delta_i`` (divided by the summed weights when ``normalize``), into
    ``out`` when given.

    With ``sign_consensus`` only the entries of ``w_i delta_i`` whose sign matches the elected sign
    enter the sum, and the divisor is, per entry, the sum of the weights that entered (1 where none
    did). That path uses ``deltas`` as scratch space: callers pass their own sparsified temporary.
    """
    count = deltas.shape[0]
    flat = deltas.reshape(count, -1)
    # mergekit multiplies in the task vectors' dtype, so the weights are rounded to it as well.
    weights = weight.to(deltas.dtype)
    if not sign_consensus:
        divisor = weights.sum()
        divisor = torch.where(divisor.abs() < _ZERO_WEIGHT_SUM, 1.0, divisor)
        coefficients = weights * lambda_ / divisor if normalize else weights * lambda_
        return weighted_sum(deltas, coefficients, start=base, out=out)

    magnitudes = flat.mul_(weights[:, None])
    sign = keep_agreeing_(magnitudes)
    mixed = model_sum(magnitudes, out=None if out is None else out.view(-1)).mul_(sign)
    if normalize:
        # sign() of a clamped magnitude is 1 where the entry agreed, 0 elsewhere.
        divisor = weighted_sum(magnitudes.sign_(), weights, start=None, out=None)
        # 1 where no weight entered (mergekit's divisor[divisor == 0] = 1), by adding 1 - |sign|, which
        # is exactly 0 elsewhere: on CPU a compare and masked_fill_ cost several times these light passes.
        mixed.div_(divisor.add_(torch.rsub(divisor.sign().abs_(), 1)))
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(base.reshape(-1)).view(base.shape)


def sparse_task_arithmetic(
    base: torch.Tensor,
    deltas: torch.Tensor,
    *,
    sparsify: Callable[..., None],
    sign_consensus: bool,
    weight: torch.Tensor,
    normalize: bool,
    rescale: bool,
    lambda_: float,
    int8_mask: bool,  # how mergekit stores its mask; no numeric effect (see sign_consensus)
    out: torch.Tensor | None = None,
    **knobs: torch.Tensor | torch.Generator,
) -> torch.Tensor:
    """mergekit's generalized task arithmetic for the methods that sparsify first (DARE, DELLA, Breadcrumbs):
    ``sparsify`` (a step from sparsify.py) writes each task vector's sparse copy, given that model's value of
    each per-model knob (density, gamma, epsilon) and ``rescale``; a random step also gets ``generator``.
    Then ``merge_task_vectors`` adds them up, TIES-elected where ``sign_consensus``. The methods register
    this one function with their step and consensus fixed (``fixed=``), as mergekit registers its variants."""
    shared = {"generator": knobs.pop("generator")} if "generator" in knobs else {}
    per_model = {name: knob.tolist() for name, knob in knobs.items()}
    kept = torch.empty_like(deltas)
    for index, (delta, into) in enumerate(zip(deltas, kept, strict=True)):
        mine = {name: values[index] for name, values in per_model.items()}
        sparsify(delta, out=into, rescale=rescale, **shared, **mine)
    return merge_task_vectors(
        base, kept, weight, normalize=normalize, lambda_=lambda_, sign_consensus=sign_consensus, out=out
    )


@merge_method(
    name="task_arithmetic",
    reference="https://arxiv.org/abs/2212.04089",
    params=(WEIGHT, NORMALIZE_OFF, LAMBDA),
    inputs="deltas",
    needs_base=True,
)
def task_arithmetic(
    base: torch.Tensor,
    deltas: torch.Tensor,
    *,
    weight: torch.Tensor,
    normalize: bool,
    lambda_: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Editing models with task arithmetic (Ilharco et al. 2023, https://arxiv.org/abs/2212.04089)."""
    return merge_task_vectors(base, deltas, weight, normalize=normalize, lambda_=lambda_, sign_consensus=False, out=out)
