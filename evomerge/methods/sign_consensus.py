"""TIES' sign election: per entry, the sign with the larger total mass wins, and only task vectors
that agree with it are merged (Yadav et al. 2023, https://arxiv.org/abs/2306.01708).

mergekit 0.1.5 elects by summed (weighted) values, its ``sum`` consensus; that is the only rule any of
its methods use, so it is the only one here. Its ``int8_mask`` flag stores the sign tensor in int8 to
save memory; the agreement mask it produces is the same boolean either way, and ours is always a
one-byte boolean, so the flag has no counterpart here beyond being accepted.
"""

from __future__ import annotations

import torch


def elected_sign(weighted: torch.Tensor) -> torch.Tensor:
    """+1 where the entries of ``weighted`` ([N, ...]) sum to >= 0 over the model axis, else -1."""
    return torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)


def agreement_mask(weighted: torch.Tensor) -> torch.Tensor:
    """True where an entry's sign equals the elected sign; zero entries never agree (sign 0)."""
    return torch.sign(weighted) == elected_sign(weighted)
