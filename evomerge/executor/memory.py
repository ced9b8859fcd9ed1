"""Will a worker's sources fit its device? Asked before loading, so a too-small device fails in a second
with the numbers, instead of minutes later with an out-of-memory kill that reads like a crash.
"""

from __future__ import annotations

import math

import psutil
import torch

from evomerge.dtypes import torch_dtype
from evomerge.errors import EvomergeError
from evomerge.io.checkpoint import Checkpoint
from evomerge.materialize.plan import validate
from evomerge.materialize.sources import MergeSources
from evomerge.recipe.dataflow import DataFlowRecipe
from evomerge.recipe.recipe import Recipe


def resident_bytes(template: Recipe | DataFlowRecipe, dtype: str) -> tuple[int, int]:
    """``(bytes, copies)`` a worker keeps resident. A PS worker holds the working model plus the base and
    every expert as the method reads them (task vectors or raw tensors), each a full copy of the model's
    tensors; a DFS worker holds each source model once (paths reference their layers, never copy them)."""
    itemsize = torch.empty((), dtype=torch_dtype(dtype)).element_size()
    if isinstance(template, DataFlowRecipe):
        checkpoints = [Checkpoint.open(source) for source in template.sources]
        elements = sum(_entries(checkpoint) for checkpoint in checkpoints)
        return elements * itemsize, len(checkpoints)
    sources = MergeSources.open(template, validate(template))
    copies = 1 + len(sources.all)
    return _entries(sources.reference) * itemsize * copies, copies


def _entries(checkpoint: Checkpoint) -> int:
    """Entries in one copy of the model: every tensor of ``checkpoint``."""
    return sum(math.prod(checkpoint.shape(name)) for name in checkpoint.names)


def free_bytes(device: torch.device) -> int:
    """What the device can still hold: CUDA's free memory, or the RAM the OS reports available."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    return psutil.virtual_memory().available


def precompute_bytes(template: Recipe | DataFlowRecipe, *, device: torch.device, dtype: str) -> int:
    """At most what the merge method keeps beside the sources to merge each candidate fast (its
    ``precompute``: TIES' sorted magnitudes and sort orders, DARE's draws on CPU), for every expert."""
    if isinstance(template, DataFlowRecipe):
        return 0
    method = validate(template)
    entries = _entries(MergeSources.open(template, method).reference)
    return entries * method.precompute_bytes(device, torch_dtype(dtype), len(template.models))


class SourcesDoNotFit(EvomergeError):
    """The device lacks the free memory to hold a worker's sources (see ``check_sources_fit``)."""


def check_sources_fit(template: Recipe | DataFlowRecipe, *, device: torch.device, dtype: str) -> None:
    """Refuse to load sources that would not fit ``device`` (activations come on top of this bound)."""
    resident, copies = resident_bytes(template, dtype)
    kept = precompute_bytes(template, device=device, dtype=dtype)
    needed = resident + kept
    available = free_bytes(device)
    if needed <= available:
        return
    what = f"{copies} copies of the model in {dtype}"
    if kept:
        what += f", and up to {kept / 2**30:.2f} GiB that {template.method} keeps to merge each candidate fast"
    smaller = "use dtype=bfloat16 (half of float32), " if dtype == "float32" else ""
    raise SourcesDoNotFit(
        f"the worker on {device} needs {needed:,} bytes ({needed / 2**30:.2f} GiB: {what}) but only {available:,} "
        f"bytes ({available / 2**30:.2f} GiB) are free there",
        f"{smaller}merge fewer models{', or use task_arithmetic (keeps nothing extra)' if kept else ''}, or run on a "
        "device with more free memory (a bigger GPU; with executor=ray each worker gets a GPU of its own)",
    )
