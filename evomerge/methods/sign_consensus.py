"""TIES' sign election: per entry, the sign with the larger total mass wins, and only task vectors
that agree with it are merged (Yadav et al. 2023, https://arxiv.org/abs/2306.01708).

mergekit 0.1.5 elects by summed (weighted) values, its ``sum`` consensus; that is the only rule any of
its methods use, so it is the only one here. Its ``int8_mask`` flag stores the sign tensor in int8 to
save memory; the agreement mask it produces is the same boolean either way, and we build no mask at
all (see ``keep_agreeing_``), so the flag has no counterpart here beyond being accepted.
"""

from __future__ import annotations

import torch


def model_sum(stacked: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``stacked.sum(dim=0)`` as N - 1 elementwise adds (into ``out`` if given): torch's reduction over
    the leading axis zero-fills its output first and runs about half as fast on CPU."""
    if len(stacked) == 1:
        return stacked[0].clone() if out is None else out.copy_(stacked[0])
    total = torch.add(stacked[0], stacked[1], out=out)
    for more in stacked[2:]:
        total.add_(more)
    return total


def elected_sign(weighted: torch.Tensor) -> torch.Tensor:
    """+1 where the entries of ``weighted`` ([N, ...]) sum to >= 0 over the model axis, else -1."""
    # sign() is -1, 0 or 1; shifted by 1/2 (exact in every float dtype) its sign is +1 exactly where
    # the sum is >= 0 (-0.0 included). Three light passes instead of a compare and a select, which
    # torch runs several times slower on CPU.
    return model_sum(weighted).sign_().add_(0.5).sign_()


def keep_agreeing_(weighted: torch.Tensor) -> torch.Tensor:
    """Overwrite ``weighted`` with the magnitudes of the entries that agree with the elected sign
    (0 elsewhere, zeros included: their sign 0 agrees with neither) and return the elected sign.

    Multiplying by the elected sign (exact: it is +-1) turns agreement into positivity, so one clamp
    replaces mergekit's sign tensor, comparison and mask multiply; ``sign * magnitudes.sum(0)`` is the
    sum of the agreeing entries and ``magnitudes > 0`` marks them.
    """
    sign = elected_sign(weighted)
    weighted.mul_(sign).clamp_(min=0)
    return sign
