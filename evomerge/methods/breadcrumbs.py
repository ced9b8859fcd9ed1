"""Model Breadcrumbs (Davari & Belilovsky 2023, https://arxiv.org/abs/2312.06795): drop each task vector's
largest outliers and smallest entries (``magnitude_outliers``), then add (breadcrumbs) or TIES-merge
(breadcrumbs_ties) what remains."""

from __future__ import annotations

from evomerge.methods.registry import (
    DENSITY,
    GAMMA,
    INT8_MASK,
    LAMBDA,
    NORMALIZE_OFF,
    RESCALE_OFF,
    WEIGHT,
    merge_method,
)
from evomerge.methods.sparsify import magnitude_outliers
from evomerge.methods.task_arithmetic import sparse_task_arithmetic

_BREADCRUMBS = {
    "reference": "https://arxiv.org/abs/2312.06795",
    "params": (WEIGHT, DENSITY, GAMMA, NORMALIZE_OFF, RESCALE_OFF, LAMBDA, INT8_MASK),
    "inputs": "deltas",
    "needs_base": True,
}
merge_method(name="breadcrumbs", fixed={"sparsify": magnitude_outliers, "sign_consensus": False}, **_BREADCRUMBS)(
    sparse_task_arithmetic
)
merge_method(name="breadcrumbs_ties", fixed={"sparsify": magnitude_outliers, "sign_consensus": True}, **_BREADCRUMBS)(
    sparse_task_arithmetic
)
