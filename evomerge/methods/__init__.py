"""Merge methods: pure tensor functions registered by name (see ``registry``).

Importing this package imports every method module, which registers it.
"""

from evomerge.methods import (  # noqa: F401  (imported to register the methods)
    arcee_fusion,
    breadcrumbs,
    dare,
    della,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    sce,
    slerp,
    task_arithmetic,
    ties,
)
from evomerge.methods.registry import MergeMethod, Param, get_method, method_names

__all__ = ["MergeMethod", "Param", "get_method", "method_names"]
