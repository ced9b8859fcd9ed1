"""DARE: drop each task-vector entry at random and rescale the rest, then add (dare_linear) or
TIES-merge (dare_ties) the sparse task vectors."""

from __future__ import annotations

import torch

from evomerge.methods import fused
from evomerge.methods.registry import (
    DENSITY,
    INT8_MASK,
    LAMBDA,
    NORMALIZE_OFF,
    RESCALE_ON,
    WEIGHT,
    merge_method,
)
from evomerge.methods.sparsify import WORD_RANGE, bernoulli_words, draw_dtype, draws_words, random_drop
from evomerge.methods.task_arithmetic import merge_task_vectors, sparse_task_arithmetic

_REFERENCE = "https://arxiv.org/abs/2311.03099"
# Entries per block of the chunked (eager) merge: its dozen temporaries are then blocks the allocator
# reuses, not tensor-sized fresh mappings whose page faults cost more than the arithmetic (mergekit's
# whole-tensor temporaries peak at 7.3 GB on a 262k-token vocabulary, ours at 4.2). Few blocks, though:
# each op on a block is one parallel region of torch's threads, whose barrier waits for the slowest
# thread, and on a shared machine that one has lost its core. On a quarter of a 262k x 640 embedding
# with two threads under load (2 cores, load average ~18), 2**17 took 97 s, 2**20 17 s and 2**22 7 s;
# with one thread 2.5, 3.0 and 3.2 s (scripts/bench_merge.py's large-vocabulary rows).
_CHUNK = 1 << 22


def dare_draws(base: torch.Tensor, deltas: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor | None:
    """Every draw DARE can take from ``generator`` for these task vectors, whatever the densities:
    N rows of ``bernoulli_words``, the k-th model that drops (density < 1) taking row k.

    Drawing is most of what a DARE merge costs on CPU (one Mersenne Twister word per entry), and a
    search merges the same resident task vectors under one seed again and again. Each kept word is
    the whole 24-bit number torch's Bernoulli compares with the keep probability, so the mask at any
    density is the one drawn live, bit for bit; that costs 4 bytes per entry per model, as much as
    float32 task vectors (fewer bits decide the mask only at probabilities rounded to fewer bits).
    None where ``bernoulli`` draws another way (on a GPU, in float64): those draw per call.
    """
    return bernoulli_words(deltas.shape, generator) if draws_words(deltas.device, deltas.dtype) else None


def dare_draws_bytes(device: torch.device, dtype: torch.dtype, count: int) -> int:
    """What ``dare_draws`` keeps per entry for ``count`` models: a float32 word per model where it keeps draws."""
    return 4 * count if draws_words(device, dtype) else 0


_PARAMS = (WEIGHT, DENSITY, NORMALIZE_OFF, RESCALE_ON, LAMBDA, INT8_MASK)
# What the two registrations share besides the consensus step.
_DARE = {
    "inputs": "deltas",
    "needs_base": True,
    "random": True,
    "precompute": dare_draws,
    "precompute_bytes": dare_draws_bytes,
}


def _dare_ties_fused(
    base: torch.Tensor,
    deltas: torch.Tensor,
    draws: torch.Tensor,
    rows: list[int | None],
    keeps: list[float],
    weight: torch.Tensor,
    *,
    normalize: bool,
    rescale: bool,
    lambda_: float,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """DARE-TIES in one pass (see fused.py) over the kept words (``[rows, numel]``): model k keeps the
    entries whose word is below ``ceil(p_k * 2**24)``, ``p_k`` its density rounded to the deltas' dtype as
    ``random_drop`` rounds it (``bernoulli``'s mask), and divides them by ``p_k``; a model kept whole keeps
    every word (cut 2**24, any row) and divides by 1 (exact), so it is copied as live."""
    work = deltas.dtype
    probabilities = torch.tensor([min(keep, 1.0) for keep in keeps], dtype=work, device=deltas.device)
    cuts = probabilities.float().mul(WORD_RANGE).ceil_()
    # random_drop divides by the probability clamped to the smallest normal number (see _draw_and_mask).
    divisors = probabilities.clamp(min=torch.finfo(work).tiny)
    spare = next((row for row in rows if row is not None), 0)
    rows = tuple(spare if row is None else row for row in rows)
    out = torch.empty_like(base) if out is None else out
    return fused.ties_by_draws(
        out,
        base,
        deltas,
        draws,
        rows,
        cuts,
        divisors,
        weight.to(work),
        lambda_,
        normalize=normalize,
        rescale=rescale,
        compiled=fused.worth_fusing(base),
    )


@merge_method(name="dare_ties", reference=_REFERENCE, params=_PARAMS, fixed={"sign_consensus": True}, **_DARE)
@merge_method(name="dare_linear", reference=_REFERENCE, params=_PARAMS, fixed={"sign_consensus": False}, **_DARE)
def dare(
    base: torch.Tensor,
    deltas: torch.Tensor,
    *,
    weight: torch.Tensor,
    density: torch.Tensor,
    normalize: bool,
    rescale: bool,
    lambda_: float,
    int8_mask: bool,  # how mergekit stores its mask; no numeric effect (see sign_consensus)
    sign_consensus: bool,
    generator: torch.Generator,
    out: torch.Tensor | None = None,
    precomputed: torch.Tensor | None = None,
) -> torch.Tensor:
    """DARE (Yu et al. 2023, https://arxiv.org/abs/2311.03099), then a sum (dare_linear) or TIES' sign election."""
    # With the draws known (kept, or drawn first on CPU) every step is elementwise: DARE-TIES over kept
    # draws merges in one pass (fused.py, compiled for large tensors), the rest a chunk at a time.
    draws = precomputed
    keeps = density.tolist()
    # Draws kept across calls mean a caller merging again and again (the in-place path): worth compiling for.
    resident = draws is not None
    if draws is None and draws_words(deltas.device, deltas.dtype):
        # Drawn live, the same words up front (one row per model that drops, in order), so the merge
        # can run in chunks here too.
        draws = bernoulli_words(torch.Size((sum(keep < 1 for keep in keeps), *deltas.shape[1:])), generator)
    if draws is None:
        return sparse_task_arithmetic(
            base,
            deltas,
            sparsify=random_drop,
            sign_consensus=sign_consensus,
            weight=weight,
            normalize=normalize,
            rescale=rescale,
            lambda_=lambda_,
            int8_mask=int8_mask,
            out=out,
            density=density,
            generator=generator,
        )
    count = deltas.shape[0]
    flat_base, flat_deltas = base.reshape(-1), deltas.reshape(count, -1)
    draws = draws.reshape(draws.shape[0], flat_base.numel())
    # A model kept whole draws nothing, as live: the k-th model that drops takes row k of the draws.
    dropping = iter(range(count))
    rows = [next(dropping) if keep < 1 else None for keep in keeps]
    if resident and sign_consensus and draw_dtype(deltas) == deltas.dtype and draws.numel() > 0:
        # One pass, compiled where the tensor is large enough to pay for the call; a small one (a norm's
        # weight) runs the same function eagerly, a couple of dozen small ops instead of the chunked path's sixty.
        return _dare_ties_fused(
            base, deltas, draws, rows, keeps, weight, normalize=normalize, rescale=rescale, lambda_=lambda_, out=out
        )
    merged = torch.empty_like(flat_base) if out is None else out.view(-1)
    block = torch.empty(count, min(_CHUNK, flat_base.numel()), dtype=deltas.dtype, device=deltas.device)
    for start in range(0, flat_base.numel(), _CHUNK):
        span = slice(start, start + _CHUNK)
        dropped = block[:, : flat_base[span].numel()]
        for delta, keep, row, drop in zip(flat_deltas, keeps, rows, dropped, strict=True):
            words = None if row is None else draws[row, span]
            random_drop(delta[span], keep, drop, rescale=rescale, generator=generator, words=words)
        merge_task_vectors(
            flat_base[span],
            dropped,
            weight,
            normalize=normalize,
            lambda_=lambda_,
            sign_consensus=sign_consensus,
            out=merged[span],
        )
    return merged.view(base.shape)
