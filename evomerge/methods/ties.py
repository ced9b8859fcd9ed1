"""TIES-Merging: trim each task vector to its largest entries, elect a sign per entry, merge the agreeing."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evomerge.methods import fused
from evomerge.methods.registry import (
    DENSITY,
    INT8_MASK,
    LAMBDA,
    NORMALIZE_ON,
    RESCALE_OFF,
    WEIGHT,
    merge_method,
)
from evomerge.methods.sparsify import magnitude, magnitude_kept, sort_key
from evomerge.methods.task_arithmetic import merge_task_vectors


@dataclass(eq=False)
class MagnitudeOrder:
    """What trimming needs of one tensor's task vectors, whatever the densities: each one's magnitudes
    sorted, so the trim at any density is ``|delta| >= the kept-th largest``, a threshold looked up
    instead of a selection made. Where a cut splits a run of equal magnitudes the sort's order decides
    which of them stay (as in mergekit); ``order`` (each task vector's descending argsort, int32) says,
    computed the first time a cut splits a run of that tensor and kept."""

    ascending: torch.Tensor  # [N, numel], in the sort key's dtype
    order: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Device memory kept, as a tensor's ``nbytes`` says it."""
        return self.ascending.nbytes + (0 if self.order is None else self.order.nbytes)

    def cuts(self, deltas: torch.Tensor, kept: list[int]) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Per model, the threshold to merge with and, where its cut splits a run of equal nonzero
        magnitudes, the flat indices of the run's entries it keeps (the threshold then keeps none of
        the run). Kept zeros add nothing to a TIES merge (their sign agrees with neither), so a cut
        among zeros keeps them all."""
        count = self.ascending.shape[1]
        first = torch.tensor([count - k for k in kept], device=self.ascending.device)[:, None]
        # Each cut's smallest kept magnitude and the largest dropped one, read in one host sync.
        pairs = self.ascending.gather(1, torch.cat([first, (first - 1).clamp(min=0)], dim=1))
        thresholds = pairs[:, 0].to(deltas.dtype)
        runs: list[torch.Tensor | None] = []
        for i, (k, (inside, outside)) in enumerate(zip(kept, pairs.tolist(), strict=True)):
            if k == count or inside != outside or inside == 0:
                runs.append(None)
                continue
            if self.order is None:
                self.order = torch.stack([torch.argsort(sort_key(delta), descending=True).int() for delta in deltas])
            # The run's entries sit at descending positions [count - hi, count - lo); those before k stay.
            hi = int(torch.searchsorted(self.ascending[i], pairs[i, :1], right=True))
            runs.append(self.order[i, count - hi : k].long())
            thresholds[i] = torch.nextafter(thresholds[i], torch.full_like(thresholds[i], torch.inf))
        return thresholds, runs


def magnitude_order(base: torch.Tensor, deltas: torch.Tensor) -> MagnitudeOrder:
    """The in-place path's precompute: each task vector's magnitudes sorted, once per resident tensor."""
    return MagnitudeOrder(ascending=torch.stack([sort_key(delta).sort().values for delta in deltas]))


def magnitude_order_bytes(device: torch.device, dtype: torch.dtype, count: int) -> int:
    """What ``magnitude_order`` keeps per entry for ``count`` task vectors, at most: each one's sort key
    (float32 on CPU for 16-bit dtypes) and int32 sort order, which tensors whose cut splits equal
    magnitudes add (in 16-bit dtypes, most of them)."""
    key = 4 if device.type == "cpu" and dtype.itemsize == 2 else dtype.itemsize
    return count * (key + 4)


@merge_method(
    name="ties",
    reference="https://arxiv.org/abs/2306.01708",
    params=(WEIGHT, DENSITY, NORMALIZE_ON, RESCALE_OFF, LAMBDA, INT8_MASK),
    inputs="deltas",
    needs_base=True,
    precompute=magnitude_order,
    precompute_bytes=magnitude_order_bytes,
)
def ties(
    base: torch.Tensor,
    deltas: torch.Tensor,
    *,
    weight: torch.Tensor,
    density: torch.Tensor,
    normalize: bool,
    rescale: bool,
    lambda_: float,
    int8_mask: bool,  # how mergekit stores its mask; no numeric effect (see sign_consensus)
    out: torch.Tensor | None = None,
    precomputed: MagnitudeOrder | None = None,
) -> torch.Tensor:
    """TIES-Merging: resolving interference when merging models (Yadav et al. 2023, https://arxiv.org/abs/2306.01708)."""
    if precomputed is not None and not rescale and deltas[0].numel():
        return _ties_resident(base, deltas, precomputed, weight, density, normalize=normalize, lambda_=lambda_, out=out)
    trimmed = torch.empty_like(deltas)
    for delta, keep, trim in zip(deltas, density.tolist(), trimmed, strict=True):
        magnitude(delta, keep, trim, rescale=rescale)
    return merge_task_vectors(base, trimmed, weight, normalize=normalize, lambda_=lambda_, sign_consensus=True, out=out)


def _ties_resident(
    base: torch.Tensor,
    deltas: torch.Tensor,
    order: MagnitudeOrder,
    weight: torch.Tensor,
    density: torch.Tensor,
    *,
    normalize: bool,
    lambda_: float,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """``ties`` without rescaling, given the magnitude order: one elementwise pass with a threshold per
    model (compiled for large tensors, fused.py), then the few entries of runs of equal magnitudes that
    a cut splits merged again with the trim's own choice among them."""
    kept = [magnitude_kept(keep, deltas[0].numel()) for keep in density.tolist()]
    thresholds, runs = order.cuts(deltas, kept)
    out = torch.empty_like(base) if out is None else out
    weights = weight.to(deltas.dtype)
    compiled = fused.worth_fusing(base)
    fused.ties_by_threshold(out, base, deltas, thresholds, weights, lambda_, normalize=normalize, compiled=compiled)
    if any(run is not None for run in runs):
        entries = torch.cat([run for run in runs if run is not None]).unique()
        flat_deltas = deltas.reshape(len(deltas), -1)[:, entries]
        trimmed = torch.stack(
            [
                torch.where((delta.abs() >= limit) | (False if run is None else torch.isin(entries, run)), delta, 0.0)
                for delta, limit, run in zip(flat_deltas, thresholds, runs, strict=True)
            ]
        )
        merged = merge_task_vectors(
            base.reshape(-1)[entries], trimmed, weight, normalize=normalize, lambda_=lambda_, sign_consensus=True
        )
        out.view(-1)[entries] = merged
    return out
