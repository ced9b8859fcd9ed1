"""NearSwap: interpolate from the base toward the model by ``t / |base - model|`` per entry (capped at 1),
so entries where the two are nearly equal take the model's value and distant ones keep the base's."""

from __future__ import annotations

import torch

from evomerge.methods.registry import Param, merge_method, written

# mergekit calls this distance "t" too, but it is not slerp's interpolation point: a difference at or
# below t takes the model's entry whole. Fine-tunes' entries differ by ~1e-4 to 1e-3 (the reference
# merge used t = 1e-4), which is the range searched by default.
DISTANCE = Param("t", per_model=False, default=None, low=0.0, search=(0.0, 1e-3))
# mergekit's floor under |base - model|: identical entries give t / 1e-6, not a division by zero.
_DIFFERENCE_FLOOR = 1e-6


@merge_method(
    name="nearswap",
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    params=(DISTANCE,),
    inputs="tensors",
    needs_base=True,
    min_models=1,
    max_models=1,
)
def nearswap(base: torch.Tensor, tensors: torch.Tensor, *, t: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """NearSwap (alchemonaut 2024, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001)."""
    # 16-bit inputs merge in float32 and are rounded once, at the end.
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    a, b = base.to(work), tensors[0].to(work)
    weight = (t / torch.abs(a - b).clamp(min=_DIFFERENCE_FLOOR)).clamp(min=0, max=1)
    return written((weight * b + (1 - weight) * a).to(base.dtype), out)
