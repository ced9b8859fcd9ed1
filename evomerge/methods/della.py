"""DELLA-Merging (Deep et al. 2024, https://arxiv.org/abs/2406.11617): drop task-vector entries at random with
probabilities ranked by magnitude (MagPrune, ``della_magprune``), rescale, then TIES-merge (della) or add
(della_linear) what remains. The two differ in their defaults too: della normalizes, della_linear does not."""

from __future__ import annotations

from evomerge.methods.registry import (
    DENSITY,
    EPSILON,
    INT8_MASK,
    LAMBDA,
    NORMALIZE_OFF,
    NORMALIZE_ON,
    RESCALE_ON,
    WEIGHT,
    merge_method,
)
from evomerge.methods.sparsify import della_magprune
from evomerge.methods.task_arithmetic import sparse_task_arithmetic

_DELLA = {"reference": "https://arxiv.org/abs/2406.11617", "inputs": "deltas", "needs_base": True, "random": True}
merge_method(
    name="della",
    params=(WEIGHT, DENSITY, EPSILON, NORMALIZE_ON, RESCALE_ON, LAMBDA, INT8_MASK),
    fixed={"sparsify": della_magprune, "sign_consensus": True},
    **_DELLA,
)(sparse_task_arithmetic)
merge_method(
    name="della_linear",
    params=(WEIGHT, DENSITY, EPSILON, NORMALIZE_OFF, RESCALE_ON, LAMBDA, INT8_MASK),
    fixed={"sparsify": della_magprune, "sign_consensus": False},
    **_DELLA,
)(sparse_task_arithmetic)
