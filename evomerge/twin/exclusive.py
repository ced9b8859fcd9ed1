"""Each expert's exclusive knowledge: a truncated SVD of (expert - shared), per 2-D weight matrix.

Read tensor by tensor: the shared model's tensor and each expert's are read from their files, their
difference factored on the chosen device, and only the factors kept, so no model is ever held whole.
"""

from __future__ import annotations

import torch

from evomerge.errors import EvomergeError
from evomerge.io.checkpoint import Checkpoint

Factors = dict[str, list[tuple[torch.Tensor, torch.Tensor]]]
Vectors = dict[str, list[torch.Tensor]]

# Randomized SVD (Halko, Martinsson and Tropp 2011, as torch.svd_lowrank does it): rank K is read from a
# sketch of 2K + 10 columns after 4 power iterations. On the toy world's matrices this gives the exact
# truncation to float32 rounding (tests/test_twin_scale.py). On a 5632 x 2048 matrix (TinyLlama's MLP) on
# this project's busy 2-core machine: 5 s for 42 columns, 130 s for the full float64 SVD.
OVERSAMPLING = 10
POWER_ITERATIONS = 4


def exclusive_parts(
    shared: Checkpoint,
    experts: list[Checkpoint],
    *,
    rank: int | None = None,
    energy: float | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[Factors, Vectors]:
    """``(factors, vectors)``: for every 2-D tensor of ``shared``, one ``(U, V)`` per expert with ``U @ V`` ~
    expert - shared; for every other tensor (norm weights, biases), each expert's whole difference.

    ``rank`` keeps that many singular values of each matrix; ``energy`` keeps the fewest whose squared
    sum reaches that fraction of the total (the paper fixes a rank; an energy fraction lets matrices the
    merge already fits well keep less). Only matrices are factored, as in the paper. The rest are kept
    whole, where the paper leaves them at the merge's values: they are a few numbers per layer, and without
    them no rank gives back an expert (the toy experts' final norms alone move their logits by 0.1).
    Rank 0 keeps nothing of the experts, norms included: the Twin model is then the shared model.
    The factors come back on the CPU in float32; the SVDs run on ``device``."""
    if (rank is None) == (energy is None):
        raise EvomergeError(
            "give exactly one of rank and energy for the exclusive parts", "pass --rank K or --energy F"
        )
    if energy is not None and not 0.0 <= energy <= 1.0:
        raise EvomergeError(f"energy fraction {energy} is outside [0, 1]", "pass a fraction such as 0.9")
    device = torch.device(device)
    factors: Factors = {}
    vectors: Vectors = {}
    # The sketches are random: one seed makes the same factors on every build on the same device.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for name in shared.names:
            base = _read(shared, name, device)
            if base.dim() == 2:
                factors[name] = [
                    _truncated(_difference(expert, base, name, index, device), name, rank=rank, energy=energy)
                    for index, expert in enumerate(experts)
                ]
            elif 0 not in (rank, energy):
                vectors[name] = [
                    _difference(expert, base, name, index, device).cpu() for index, expert in enumerate(experts)
                ]
    return factors, vectors


def _read(checkpoint: Checkpoint, name: str, device: torch.device) -> torch.Tensor:
    # A positioned read into a tensor of the stored dtype (read_into's fast path), then one cast on the device.
    stored = torch.empty(checkpoint.shape(name), dtype=checkpoint.dtype(name))
    return checkpoint.read_into(name, stored).to(device=device, dtype=torch.float32)


def _difference(expert: Checkpoint, base: torch.Tensor, name: str, index: int, device: torch.device) -> torch.Tensor:
    shape = tuple(expert.shape(name)) if name in expert.names else None
    if shape != tuple(base.shape):
        got = "no such tensor" if shape is None else f"shape {shape}"
        raise EvomergeError(
            f"expert {index} has {got} for '{name}', where the shared model has shape {tuple(base.shape)}; "
            "Twin-Merging adds each expert's difference to the shared weights, so every expert must have "
            "the shared model's architecture",
            "use experts fine-tuned from the same base model as the merge",
        )
    return _read(expert, name, device).sub_(base)


def _truncated(
    delta: torch.Tensor, name: str, *, rank: int | None, energy: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    full = min(delta.shape)
    if rank is not None and not 0 <= rank <= full:
        raise EvomergeError(
            f"rank {rank} is above the size of '{name}' ({delta.shape[0]} x {delta.shape[1]}, at most rank {full})",
            f"use a rank from 0 to {full}, or an energy fraction (--energy) that adapts to each matrix",
        )
    if rank is not None:
        if rank == 0:
            return delta.new_zeros((delta.shape[0], 0)).cpu(), delta.new_zeros((0, delta.shape[1])).cpu()
        u, s, v = torch.svd_lowrank(delta, q=min(2 * rank + OVERSAMPLING, full), niter=POWER_ITERATIONS)
        return (u[:, :rank] * s[:rank]).cpu().contiguous(), v[:, :rank].T.cpu().contiguous()
    # An energy fraction needs the whole spectrum: a full SVD, in float64 so that the full-rank product
    # gives back the expert's weights to float32 precision.
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    total = (s**2).sum()
    if total == 0:
        kept = 0
    else:
        reached = torch.cumsum(s**2, 0) / total >= energy - 1e-12
        kept = int(torch.nonzero(reached)[0]) + 1
    return (u[:, :kept] * s[:kept]).float().cpu().contiguous(), vh[:kept].float().cpu().contiguous()


def kept_bytes(factors: Factors, vectors: Vectors) -> int:
    """Bytes the exclusive parts take, as stored (float32)."""
    tensors = [t for pairs in factors.values() for pair in pairs for t in pair]
    tensors += [t for deltas in vectors.values() for t in deltas]
    return sum(t.numel() * t.element_size() for t in tensors)
