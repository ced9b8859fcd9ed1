"""Sparsifying one task vector: which entries survive, and how the survivors are rescaled.

Each function writes the sparsified ``delta`` into ``out`` (same shape and dtype) and leaves ``delta``
untouched. Keep ratios arrive as host floats: the number of kept entries is a host integer that slices a
sort order, and a ratio of 1 (or more) copies the task vector without drawing anything, exactly as
mergekit does, so a seeded generator is consumed the same way mergekit consumes torch's global one.

``rescale`` for the deterministic sparsifiers (magnitude for TIES, magnitude_outliers for Model
Breadcrumbs) follows mergekit 0.1.5: it matches the L1 norm of the original task vector
(``masked * |delta|_1 / |masked|_1``). For the random ones (DARE, DELLA) it is the papers' element-wise
rescale instead: an entry kept with probability ``p`` is divided by ``p`` (DARE's ``1 / density``,
DELLA's per-entry ``1 / p_i``), so the expected sparsified task vector is the original one exactly, as
the project's merge-engine issue asks. mergekit 0.1.5 applies its L1 ratio there too, which is biased
(for DELLA towards large entries, whose keep probabilities are higher); so a rescaled DARE or DELLA merge
differs from mergekit's by that scale, while the masks it draws are mergekit's, draw for draw: each entry
kept with exactly the probability asked for (``torch.bernoulli``'s comparison, see ``bernoulli``).
"""

from __future__ import annotations

import torch

from evomerge.errors import EvomergeError

# mergekit's threshold below which an L1 norm counts as zero and the masked vector is left unscaled.
_RESCALE_EPS = 1e-7
# torch's CPU Bernoulli compares the low 24 bits of one Mersenne Twister word per entry (see ``bernoulli``).
WORD_RANGE = 1 << 24


def rescale_l1_(pruned: torch.Tensor, original: torch.Tensor) -> None:
    """Scale ``pruned`` in place so its L1 norm equals ``original``'s (unless either norm is ~0)."""
    before = torch.linalg.vector_norm(original, ord=1)
    after = torch.linalg.vector_norm(pruned, ord=1)
    # torch.where, not an `if`, so no host sync: the ratio's inf/nan on the unselected side is discarded.
    degenerate = (before < _RESCALE_EPS) | (after < _RESCALE_EPS)
    pruned.mul_(torch.where(degenerate, 1.0, before / after))


def magnitude(delta: torch.Tensor, density: float, out: torch.Tensor, *, rescale: bool) -> None:
    """Keep the ``max(1, int(density * numel))`` largest-magnitude entries (TIES' trim step)."""
    if density >= 1:
        out.copy_(delta)
        return
    if density <= 0 or delta.numel() == 0:
        out.zero_()
        return
    kept = magnitude_kept(density, delta.numel())
    keep = _largest(sort_key(delta), kept).view(delta.shape)
    # A float mask: torch multiplies by a bool tensor several times slower than by a float one on CPU.
    torch.mul(delta, keep.to(delta.dtype), out=out)
    if rescale:
        rescale_l1_(out, delta)


def magnitude_kept(density: float, numel: int) -> int:
    """How many entries ``magnitude`` keeps at ``density`` (mergekit's rule: at least one)."""
    return numel if density >= 1 else max(1, int(density * numel))


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, out: torch.Tensor, *, rescale: bool) -> None:
    """Model Breadcrumbs: drop the ``gamma`` largest-magnitude fraction and the smallest entries,
    keeping ``int(density * numel)``; when ``density + gamma > 1`` fewer outliers are dropped so the
    kept count still holds (mergekit's rule). ``density >= 1`` keeps everything, outliers included."""
    if density >= 1:
        out.copy_(delta)
        return
    count = delta.numel()
    kept = int(density * count)
    dropped_top = int(gamma * count)
    dropped_bottom = max(0, count - kept - dropped_top)
    order = torch.argsort(sort_key(delta))
    _keep_only(delta, order[dropped_bottom : dropped_bottom + kept], out)
    if rescale:
        rescale_l1_(out, delta)


def random_drop(
    delta: torch.Tensor,
    density: float,
    out: torch.Tensor,
    *,
    rescale: bool,
    generator: torch.Generator,
    words: torch.Tensor | None = None,
) -> None:
    """DARE: keep each entry independently with probability ``density`` (rescaled by ``1 / density``).

    ``words``: the draw ``bernoulli_words`` would take from ``generator`` here, taken earlier and kept
    (the in-place path keeps them per resident task vector); the mask is then the one drawn live.
    """
    if density >= 1:
        out.copy_(delta)
        return
    keep_probability = torch.full((), density, dtype=draw_dtype(delta), device=delta.device)
    _draw_and_mask(delta, keep_probability, out, rescale=rescale, generator=generator, words=words)


def della_magprune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    out: torch.Tensor,
    *,
    rescale: bool,
    generator: torch.Generator,
) -> None:
    """DELLA's MagPrune: keep each entry with a probability rising linearly with its magnitude rank,
    from ``density - epsilon`` (smallest) to ``density + epsilon`` (largest); ``rescale`` divides each
    survivor by its own keep probability.

    Ranks run along dim 1 (within each row of a matrix; over the whole of a 1-D tensor), as in
    mergekit. A row of one entry has no rank spread; mergekit fails there (0/0), we keep it with
    probability ``density``.
    """
    if density >= 1:
        out.copy_(delta)
        return
    if density <= 0:
        out.zero_()
        return
    if density - epsilon <= 0 or density + epsilon >= 1:
        raise EvomergeError(
            f"della: density {density:g} with epsilon {epsilon:g} gives keep probabilities outside (0, 1)",
            "choose epsilon < min(density, 1 - density), e.g. a smaller epsilon",
        )
    work = draw_dtype(delta)
    rows = delta if delta.ndim >= 2 else delta.reshape(1, -1)
    width = rows.shape[1]
    if width == 1:
        probability = torch.full(rows.shape, density, dtype=work, device=delta.device)
    else:
        # Ranks 1..width exactly as mergekit rounds them in the working dtype (bf16 rounds large ranks),
        # so min/max normalisation and hence the probabilities agree with it in every dtype.
        rank_values = torch.arange(width, device=delta.device).to(work) + 1
        along_dim1 = [1] * rows.ndim
        along_dim1[1] = width
        order = torch.argsort(rows.abs(), dim=1)
        ranks = torch.empty(order.shape, dtype=work, device=delta.device)
        # The inverse permutation of the sort order is each entry's rank (one sort instead of two).
        ranks.scatter_(1, order, rank_values.view(along_dim1).expand(order.shape))
        lowest, highest = rank_values.min(), rank_values.max()
        probability = ranks.sub_(lowest).div_(highest - lowest).clamp_(0, 1)
        probability.mul_(2).mul_(epsilon).add_(density - epsilon)
    _draw_and_mask(rows, probability, out.view(rows.shape), rescale=rescale, generator=generator)


def _draw_and_mask(
    delta: torch.Tensor,
    keep_probability: torch.Tensor,
    out: torch.Tensor,
    *,
    rescale: bool,
    generator: torch.Generator,
    words: torch.Tensor | None = None,
) -> None:
    """Bernoulli-mask ``delta`` into ``out`` (one draw per entry, in memory order, like mergekit), and
    with ``rescale`` divide each survivor by its keep probability.

    ``keep_probability`` is ``delta``'s shape or a 0-d tensor (one probability for all), in the draw
    dtype, and is clamped in place once drawn from. Survivors are divided by the very values the draw
    used (rounded to a 16-bit dtype where the draw is), so the rescale is unbiased for the actual draw.
    """
    keep = bernoulli(keep_probability, delta.shape, generator, words=words)
    if keep.dtype == out.dtype:
        masked = torch.mul(keep, delta, out=out)
    else:
        masked = keep.mul_(delta.to(keep.dtype))
    if rescale:
        # A probability that rounds to 0 in the draw dtype (a tiny density in float16) never keeps its
        # entry; the clamp turns that entry's 0 / 0 into 0 and leaves every normal probability unchanged.
        masked.div_(keep_probability.clamp_(min=torch.finfo(keep_probability.dtype).tiny))
    if masked is not out:
        out.copy_(masked)


def bernoulli(
    probability: torch.Tensor, shape: torch.Size, generator: torch.Generator, *, words: torch.Tensor | None = None
) -> torch.Tensor:
    """``torch.bernoulli(probability.expand(shape), generator=generator)``, draw for draw, in half the
    time on CPU.

    There torch draws entry by entry, in memory order, one 32-bit Mersenne Twister word each: with
    ``r`` its low 24 bits, the entry is 1 iff ``r * 2**-24 < p`` (``p`` as a float32). ``torch.randint``
    over ``[0, 2**24)`` takes the same word per entry and yields the same ``r`` without the per-entry
    distribution object; and ``r < p * 2**24`` iff ``r < ceil(p * 2**24)``, integers below 2**25 that
    float32 holds exactly, so ``clamp(ceil(p * 2**24) - r, 0, 1)`` is the very mask, and the generator
    ends in the same state. float64 probabilities take 64-bit words, and other devices other
    generators: those keep ``torch.bernoulli``. tests/test_methods.py checks the equality.

    ``words``, when given, are those ``bernoulli_words`` drew for this call, and the generator is not
    touched.
    """
    if words is None:
        if not draws_words(probability.device, probability.dtype):
            return torch.bernoulli(probability.expand(shape), generator=generator)
        words = bernoulli_words(shape, generator)
    cut = probability.float().mul(WORD_RANGE).ceil_()
    return torch.rsub(words, cut).clamp_(0, 1).to(probability.dtype)


def draws_words(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``bernoulli`` draws as ``bernoulli_words`` for probabilities (or task vectors) on
    ``device`` in ``dtype``: on CPU, in any dtype but float64."""
    return device.type == "cpu" and dtype != torch.float64


def bernoulli_words(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """The 24-bit words (float32) ``bernoulli`` compares with its probabilities, one per entry; a
    ``[N, *shape]`` draw is N consecutive draws of ``shape``, row by row."""
    return torch.randint(0, WORD_RANGE, shape, generator=generator, dtype=torch.float32)


def _keep_only(delta: torch.Tensor, kept: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` = ``delta`` at the flat indices ``kept``, zero elsewhere."""
    mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    mask[kept] = True
    torch.mul(delta, mask.view(delta.shape), out=out)


def _largest(key: torch.Tensor, kept: int) -> torch.Tensor:
    """A flat mask of the ``kept`` largest entries of ``key``, the same ones the descending sort puts first.

    Which entries those are is a question of order only at the cut: if no value equal to the
    ``kept``-th largest is left out, the mask is simply ``key >= that value``, and a selection
    (``kthvalue``, linear time) finds it about four times faster than a sort on a 12M-entry float32
    task vector. When equal values straddle the cut, the sort decides which of them stay, as it does
    in mergekit: its tie order is its own (torch's CPU sort is not stable), so nothing cheaper
    reproduces it. Quantized task vectors (bf16, or fine-tunes a few ulps from their base) tie often
    and pay the selection and the sort.
    """
    keep = key >= kth_largest(key, kept)
    # count_nonzero, not sum: torch sums a bool tensor fifty times slower on CPU.
    if int(torch.count_nonzero(keep)) == kept:
        return keep
    keep.zero_()
    keep[torch.argsort(key, descending=True)[:kept]] = True
    return keep


def kth_largest(key: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest entry of the flat, non-negative ``key`` (0-d), as
    ``torch.kthvalue(key, key.numel() - k + 1)`` finds it.

    On CPU kthvalue partitions a copy of the whole tensor. Non-negative float32 values order as their
    bit patterns do, so for those a histogram of the top 16 bits first names the bucket that holds the
    ``k``-th largest, and kthvalue runs on that bucket alone: three times faster on a 12M-entry task vector.
    """
    if key.device.type != "cpu" or key.dtype != torch.float32:
        return torch.kthvalue(key, key.numel() - k + 1).values
    buckets = torch.bitwise_right_shift(key.view(torch.int32), 16)
    from_top = torch.bincount(buckets, minlength=1 << 15).flip(0).cumsum(0)
    index = int(torch.searchsorted(from_top, k))  # the first bucket from the top reaching k entries
    above = int(from_top[index - 1]) if index else 0
    candidates = key[buckets == from_top.numel() - 1 - index]
    return torch.kthvalue(candidates, candidates.numel() - (k - above) + 1).values


def sort_key(delta: torch.Tensor) -> torch.Tensor:
    """Flat magnitudes to sort. mergekit sorts a float32 copy on CPU; the upcast is exact for 16-bit
    floats, and sorting the same values with the same kernel breaks magnitude ties the same way."""
    key = delta.abs().reshape(-1)
    if key.device.type == "cpu" and key.dtype in (torch.float16, torch.bfloat16):
        key = key.float()
    return key


def draw_dtype(delta: torch.Tensor) -> torch.dtype:
    """The dtype of keep probabilities and masks: the input's, except float16 on CPU, where torch has
    no Bernoulli kernel and mergekit draws in float32."""
    if delta.device.type == "cpu" and delta.dtype == torch.float16:
        return torch.float32
    return delta.dtype
