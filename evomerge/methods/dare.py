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
from evomerge.methods.sparsify import WORD_RANGE, bernoulli_words, draw_dtype, draws_words, random_drop, words_drawn
from evomerge.methods.task_arithmetic import merge_task_vectors

_REFERENCE = "https://arxiv.org/abs/2311.03099"
# Entries per block of the chunked (eager) merge: its dozen temporaries are then blocks the allocator
# reuses and the cache holds, not tensor-sized fresh mappings whose page faults cost more than the
# arithmetic. 2**17 (half a megabyte of float32) measured fastest for the same chunked TIES merge:
# 0.42 s per candidate on the merge bench against 0.48 s at 2**18 and 0.64 s at 2**16.
_CHUNK = 1 << 17


def dare_draws(base: torch.Tensor, deltas: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor | None:
    """Every draw DARE can take from ``generator`` for these task vectors, whatever the densities:
    N rows of ``bernoulli_words``, the k-th model that drops (density < 1) taking row k.

    Drawing is most of what a DARE merge costs on CPU (one Mersenne Twister word per entry), and a
    search merges the same resident task vectors under one seed again and again; the rows cost 4 bytes
    per entry per model, as much as float32 task vectors. None where ``bernoulli`` draws another way
    (on a GPU, in float64): those draw per call.
    """
    return bernoulli_words(deltas.shape, generator) if draws_words(deltas) else None


def dare_draws_bytes(device: torch.device, dtype: torch.dtype) -> int:
    """What ``dare_draws`` keeps per entry of each model: a float32 word where it keeps draws at all."""
    return 4 if words_drawn(device, dtype) else 0


def _dare(
    base: torch.Tensor,
    deltas: torch.Tensor,
    weight: torch.Tensor,
    density: torch.Tensor,
    *,
    normalize: bool,
    rescale: bool,
    lambda_: float,
    sign_consensus: bool,
    generator: torch.Generator,
    draws: torch.Tensor | None,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """Drop, rescale and merge; with the draws known (kept, or drawn first on CPU) every step is
    elementwise: kept draws on a large tensor merge in one compiled pass (fused.py, DARE-TIES), the
    rest a chunk at a time (small temporaries)."""
    keeps = density.tolist()
    # Draws kept across calls mean a caller merging again and again (the in-place path): worth compiling for.
    resident = draws is not None
    if draws is None and draws_words(deltas):
        # Drawn live, the same words up front (one row per model that drops, in order), so the merge
        # can run in chunks here too.
        draws = bernoulli_words(torch.Size((sum(keep < 1 for keep in keeps), *deltas.shape[1:])), generator)
    if draws is None:
        dropped = torch.empty_like(deltas)
        for delta, keep, drop in zip(deltas, keeps, dropped, strict=True):
            random_drop(delta, keep, drop, rescale=rescale, generator=generator)
        return merge_task_vectors(
            base, dropped, weight, normalize=normalize, lambda_=lambda_, sign_consensus=sign_consensus, out=out
        )
    count = deltas.shape[0]
    flat_base, flat_deltas = base.reshape(-1), deltas.reshape(count, -1)
    # A model kept whole draws nothing, as live: the k-th model that drops takes row k of the draws.
    rows = iter(draws.reshape(draws.shape[0], flat_base.numel()))
    words = [next(rows) if keep < 1 else None for keep in keeps]
    fusable = resident and sign_consensus and draw_dtype(deltas) == deltas.dtype and draws.shape[0] > 0
    if fusable and fused.worth_fusing(base):
        return _dare_ties_fused(
            base, deltas, words, keeps, weight, normalize=normalize, rescale=rescale, lambda_=lambda_, out=out
        )
    merged = torch.empty_like(flat_base) if out is None else out.view(-1)
    block = torch.empty(count, min(_CHUNK, flat_base.numel()), dtype=deltas.dtype, device=deltas.device)
    for start in range(0, flat_base.numel(), _CHUNK):
        span = slice(start, start + _CHUNK)
        dropped = block[:, : flat_base[span].numel()]
        for delta, keep, row, drop in zip(flat_deltas, keeps, words, dropped, strict=True):
            chunk = None if row is None else row[span]
            random_drop(delta[span], keep, drop, rescale=rescale, generator=generator, words=chunk)
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


def _dare_ties_fused(
    base: torch.Tensor,
    deltas: torch.Tensor,
    words: list[torch.Tensor | None],
    keeps: list[float],
    weight: torch.Tensor,
    *,
    normalize: bool,
    rescale: bool,
    lambda_: float,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """DARE-TIES in one compiled pass (see fused.py), given the words ``bernoulli`` compares: each
    probability rounded to the deltas' dtype as ``random_drop`` rounds it, its cut ``ceil(p * 2**24)``;
    a model kept whole keeps every word (cut 2**24) and divides by 1 (exact), so it is copied as live."""
    probabilities = torch.tensor([min(keep, 1.0) for keep in keeps], dtype=deltas.dtype, device=deltas.device)
    cuts = probabilities.float().mul(WORD_RANGE).ceil_()
    # random_drop divides by the probability clamped to the smallest normal number (see _draw_and_mask).
    probabilities.clamp_(min=torch.finfo(deltas.dtype).tiny)
    spare = next(row for row in words if row is not None)
    rows = [spare if row is None else row for row in words]
    out = torch.empty_like(base) if out is None else out
    weights = weight.to(deltas.dtype)
    return fused.ties_by_words(
        out,
        base,
        deltas,
        rows,
        cuts,
        probabilities,
        weights,
        lambda_,
        normalize=normalize,
        rescale=rescale,
        compiled=True,
    )


@merge_method(
    name="dare_ties",
    reference=_REFERENCE,
    params=(WEIGHT, DENSITY, NORMALIZE_OFF, RESCALE_ON, LAMBDA, INT8_MASK),
    inputs="deltas",
    needs_base=True,
    random=True,
    precompute=dare_draws,
    precompute_bytes=dare_draws_bytes,
)
def dare_ties(
    base: torch.Tensor,
    deltas: torch.Tensor,
    *,
    weight: torch.Tensor,
    density: torch.Tensor,
    normalize: bool,
    rescale: bool,
    lambda_: float,
    int8_mask: bool,  # how mergekit stores its mask; no numeric effect (see sign_consensus)
    generator: torch.Generator,
    out: torch.Tensor | None = None,
    precomputed: torch.Tensor | None = None,
) -> torch.Tensor:
    """DARE (Yu et al. 2023, https://arxiv.org/abs/2311.03099) with TIES sign election."""
    return _dare(
        base,
        deltas,
        weight,
        density,
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
        sign_consensus=True,
        generator=generator,
        draws=precomputed,
        out=out,
    )


@merge_method(
    name="dare_linear",
    reference=_REFERENCE,
    params=(WEIGHT, DENSITY, NORMALIZE_OFF, RESCALE_ON, LAMBDA),
    inputs="deltas",
    needs_base=True,
    random=True,
    precompute=dare_draws,
    precompute_bytes=dare_draws_bytes,
)
def dare_linear(
    base: torch.Tensor,
    deltas: torch.Tensor,
    *,
    weight: torch.Tensor,
    density: torch.Tensor,
    normalize: bool,
    rescale: bool,
    lambda_: float,
    generator: torch.Generator,
    out: torch.Tensor | None = None,
    precomputed: torch.Tensor | None = None,
) -> torch.Tensor:
    """DARE, Language models are Super Mario (Yu et al. 2023, https://arxiv.org/abs/2311.03099)."""
    return _dare(
        base,
        deltas,
        weight,
        density,
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
        sign_consensus=False,
        generator=generator,
        draws=precomputed,
        out=out,
    )
