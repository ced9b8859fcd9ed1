"""Each expert's exclusive knowledge: a truncated SVD of (expert - shared), per 2-D weight matrix."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from evomerge.errors import EvomergeError


def exclusive_factors(
    shared: Mapping[str, torch.Tensor],
    experts: list[Mapping[str, torch.Tensor]],
    *,
    rank: int | None = None,
    energy: float | None = None,
) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """For every 2-D tensor of ``shared``: one ``(U, V)`` per expert with ``U @ V`` ~ expert - shared.

    ``rank`` keeps that many singular values of each matrix; ``energy`` keeps the fewest whose squared
    sum reaches that fraction of the total (the paper fixes a rank; an energy fraction lets matrices the
    merge already fits well keep less). Only matrices are factored, as in the paper; see
    ``exclusive_vectors`` for the rest."""
    if (rank is None) == (energy is None):
        raise EvomergeError(
            "give exactly one of rank and energy for the exclusive parts", "pass --rank K or --energy F"
        )
    if energy is not None and not 0.0 <= energy <= 1.0:
        raise EvomergeError(f"energy fraction {energy} is outside [0, 1]", "pass a fraction such as 0.9")
    factors = {}
    for name, base in shared.items():
        if base.dim() != 2:
            continue
        factors[name] = []
        for index, expert in enumerate(experts):
            delta = _difference(expert, base, name, index)
            factors[name].append(_truncated(delta, name, rank=rank, energy=energy))
    return factors


def exclusive_vectors(
    shared: Mapping[str, torch.Tensor], experts: list[Mapping[str, torch.Tensor]]
) -> dict[str, list[torch.Tensor]]:
    """Every tensor that is not a matrix (norm weights, biases), kept whole: one difference per expert.

    The paper leaves these at the merge's values; they are a few numbers per layer, and without them no
    rank gives back an expert (the toy experts' final norms alone move their logits by 0.1)."""
    return {
        name: [_difference(expert, base, name, index) for index, expert in enumerate(experts)]
        for name, base in shared.items()
        if base.dim() != 2
    }


def _difference(expert: Mapping[str, torch.Tensor], base: torch.Tensor, name: str, index: int) -> torch.Tensor:
    tensor = expert.get(name)
    if tensor is None or tensor.shape != base.shape:
        got = "no such tensor" if tensor is None else f"shape {tuple(tensor.shape)}"
        raise EvomergeError(
            f"expert {index} has {got} for '{name}', where the shared model has shape {tuple(base.shape)}; "
            "Twin-Merging adds each expert's difference to the shared weights, so every expert must have "
            "the shared model's architecture",
            "use experts fine-tuned from the same base model as the merge",
        )
    return tensor.float() - base.float()


def _truncated(delta: torch.Tensor, name: str, *, rank: int | None, energy: float | None) -> tuple:
    full = min(delta.shape)
    if rank is not None and not 0 <= rank <= full:
        raise EvomergeError(
            f"rank {rank} is above the size of '{name}' ({delta.shape[0]} x {delta.shape[1]}, at most rank {full})",
            f"use a rank from 0 to {full}, or an energy fraction (--energy) that adapts to each matrix",
        )
    # float64: the full-rank product must give back the expert's weights to float32 precision.
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    if rank is None:
        total = (s**2).sum()
        if total == 0:
            rank = 0
        else:
            reached = torch.cumsum(s**2, 0) / total >= energy - 1e-12
            rank = int(torch.nonzero(reached)[0]) + 1
    return (u[:, :rank] * s[:rank]).float().contiguous(), vh[:rank].float().contiguous()


def kept_bytes(
    factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]], vectors: dict[str, list[torch.Tensor]]
) -> int:
    """Bytes the exclusive parts take, as stored (float32)."""
    tensors = [t for pairs in factors.values() for pair in pairs for t in pair]
    tensors += [t for deltas in vectors.values() for t in deltas]
    return sum(t.numel() * t.element_size() for t in tensors)
