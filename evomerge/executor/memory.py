"""Will a worker's sources fit its device? Asked before loading, so a too-small device fails in a second
with the numbers, instead of minutes later with an out-of-memory kill that reads like a crash.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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
    """The device lacks the free memory for a worker in any memory tier (see ``plan_memory``)."""


# The memory tiers in the order a worker prefers them (materialize/in_place.py says what each keeps where).
TIERS = ("resident", "host", "disk")


@dataclass(frozen=True)
class MemoryPlan:
    """A worker's memory tier and the bytes each part takes: on the device, and in host memory beside it."""

    tier: str
    precompute: bool  # whether the method keeps its precompute (resident only)
    device_parts: dict[str, int]
    host_parts: dict[str, int]
    device_free: int
    host_free: int

    @property
    def short(self) -> bool:
        """Whether the headroom is below the reserve (a default reserve that did not fit)."""
        return self.headroom < self.device_parts.get("reserve", 0)

    @property
    def headroom(self) -> int:
        """What the device keeps free for the KV cache and activations: its free memory less everything but
        the reserve, which is the headroom's floor."""
        return self.device_free - sum(v for k, v in self.device_parts.items() if k != "reserve")

    def describe(self, device: torch.device) -> str:
        parts = ", ".join(f"{name} {value / 2**30:.2f} GiB" for name, value in self.device_parts.items())
        host = ", ".join(f"{name} {value / 2**30:.2f} GiB" for name, value in self.host_parts.items())
        kept = " with the method's precompute" if self.precompute else ""
        return (
            f"memory tier {self.tier}{kept} on {device}: "
            f"{parts}{f'; in host memory: {host}' if host else ''}; headroom for KV cache and activations "
            f"{self.headroom / 2**30:.2f} GiB of {self.device_free / 2**30:.2f} GiB free"
            + (
                "; below the reserve: long batches may run out of memory (lower tasks.batch_size, set "
                "tasks.model_args.max_length to the tasks' length, or set executor.reserve_bytes)"
                if self.short
                else ""
            )
        )


def tier_options(
    *, model: int, sources: int, precompute: int, stream: int, reserve: int, device_is_host: bool
) -> list[tuple[str, bool, dict[str, int], dict[str, int]]]:
    """Each way a worker can keep its sources, fastest first: ``(tier, precompute, device parts, host parts)``.

    ``model``: the working model; ``sources``: every source copy the method reads; ``precompute``: what the
    method keeps to merge fast; ``stream``: one tensor's inputs (the largest), which the host and disk tiers
    hold on the device while it merges; ``reserve``: the KV cache and activations. On a CPU the host tier
    is the resident one (host memory is the device's), so it is not offered.
    """
    options = []
    if precompute:
        options.append(("resident", True, {"model": model, "sources": sources, "precompute": precompute}, {}))
    options.append(("resident", False, {"model": model, "sources": sources}, {}))
    if not device_is_host:
        options.append(("host", False, {"model": model, "streamed tensors": 2 * stream}, {"sources": sources}))
    options.append(("disk", False, {"model": model, "streamed tensor": stream}, {}))
    return [(tier, pre, {**device, "reserve": reserve}, host) for tier, pre, device, host in options]


def choose_tier(
    options: list[tuple[str, bool, dict[str, int], dict[str, int]]],
    *,
    device_free: int,
    host_free: int,
    forced: str = "auto",
    device: str = "the device",
) -> MemoryPlan:
    """The first option that fits (of tier ``forced`` unless auto); else a one-paragraph refusal with each
    tier's needs, naming the tier that would fit where one was forced."""
    plans = [MemoryPlan(t, pre, dev, host, device_free, host_free) for t, pre, dev, host in options]
    fitting = [
        plan
        for plan in plans
        if sum(plan.device_parts.values()) <= device_free and sum(plan.host_parts.values()) <= host_free
    ]
    chosen = [plan for plan in fitting if forced in ("auto", plan.tier)]
    if chosen:
        return chosen[0]
    needs = "; ".join(
        f"{plan.tier}{' with precompute' if plan.precompute else ''} needs {sum(plan.device_parts.values()) / 2**30:.2f} GiB"
        + (f" there and {sum(plan.host_parts.values()) / 2**30:.2f} GiB of host memory" if plan.host_parts else "")
        for plan in plans
        if forced in ("auto", plan.tier)
    )
    other = f"executor.tier={fitting[0].tier} (or auto) fits; " if fitting else ""
    raise SourcesDoNotFit(
        f"the worker on {device} fits no memory tier{'' if forced == 'auto' else f' of {forced}'}: {needs}; "
        f"{device_free / 2**30:.2f} GiB are free there and {host_free / 2**30:.2f} GiB in host memory",
        f"{other}use dtype=bfloat16 (half of float32), merge fewer models, lower executor.reserve_bytes, or run on "
        "a device with more free memory",
    )


def default_reserve(config: dict, *, dtype: str, batch_size: int | str, max_length: int | None) -> int:
    """Bytes for scoring one batch: the KV cache, the float32 logits lm-eval takes a log-softmax of, and one
    layer's activations, for ``batch_size`` requests of ``max_length`` tokens (lm-eval's own default:
    the model's context, capped at 2048). ``batch_size=auto`` counts one request: lm-eval then sizes its
    batches to the memory left, so set ``executor.reserve_bytes`` if scoring needs more."""
    itemsize = torch.empty((), dtype=torch_dtype(dtype)).element_size()
    length = max_length or min(int(config.get("max_position_embeddings") or 2048), 2048)
    batch = batch_size if isinstance(batch_size, int) else 1
    hidden, layers = int(config.get("hidden_size") or 0), int(config.get("num_hidden_layers") or 0)
    heads = int(config.get("num_attention_heads") or 1)
    head_dim = int(config.get("head_dim") or hidden // heads)  # a config may hold head_dim: null
    kv_heads = int(config.get("num_key_value_heads") or heads)
    intermediate = int(config.get("intermediate_size") or 4 * hidden)
    tokens = batch * length
    kv_cache = 2 * layers * kv_heads * head_dim * tokens * itemsize
    logits = tokens * int(config.get("vocab_size") or 0) * 4
    activations = tokens * (4 * hidden + 2 * intermediate) * itemsize
    return kv_cache + logits + activations


def plan_memory(
    template: Recipe | DataFlowRecipe,
    *,
    device: torch.device,
    dtype: str,
    reserve: int,
    tier: str = "auto",
    devices: Sequence[str] | None = None,
    reserve_required: bool = True,
) -> MemoryPlan:
    """The tier a worker uses for ``template``'s sources on ``device`` (``tier``: auto, or one forced). A
    model placed across ``devices`` counts their free memory together: the placement balances bytes.

    ``reserve_required`` false (the default reserve, a worst case of full-length batches): where no tier
    fits with it, the fastest that fits without it is used and the plan says the headroom is short."""
    if tier not in ("auto", *TIERS):
        raise EvomergeError(f"executor.tier={tier} is not a memory tier", f"use auto or one of {', '.join(TIERS)}")
    resident, copies = resident_bytes(template, dtype)
    itemsize = torch.empty((), dtype=torch_dtype(dtype)).element_size()
    if isinstance(template, DataFlowRecipe):  # paths run the sources' own layers: they stay resident
        options, tier = [("resident", False, {"sources": resident, "reserve": reserve}, {})], "auto"
    else:
        sources = MergeSources.open(template, validate(template))
        model = resident // copies
        largest = max(math.prod(sources.reference.shape(name)) for name in sources.reference.names)
        options = tier_options(
            model=model,
            sources=resident - model,
            precompute=precompute_bytes(template, device=device, dtype=dtype),
            stream=largest * itemsize * len(sources.all),
            reserve=reserve,
            device_is_host=device.type == "cpu",
        )
    host = psutil.virtual_memory().available
    spanned = sorted({torch.device(d) for d in devices or [device]}, key=str)
    free = sum(free_bytes(d) for d in spanned)
    where = str(device) if len(spanned) == 1 else "+".join(map(str, spanned))
    try:
        return choose_tier(options, device_free=free, host_free=host, forced=tier, device=where)
    except SourcesDoNotFit as refusal:
        if not reserve_required:
            relaxed = [(t, pre, {**dev, "reserve": 0}, hst) for t, pre, dev, hst in options]
            try:
                plan = choose_tier(relaxed, device_free=free, host_free=host, forced=tier, device=where)
                return MemoryPlan(**{**vars(plan), "device_parts": {**plan.device_parts, "reserve": reserve}})
            except SourcesDoNotFit:
                pass
        if device.type != "cuda" or not free:
            raise
        # GPUs like these that would hold the fastest tier, the model placed across them (placement.py).
        fastest = sum(options[0][2].values())
        count = math.ceil(fastest * len(spanned) / free)
        raise SourcesDoNotFit(
            refusal.problem,
            f"executor.gpus_per_worker={count} would hold it {options[0][0]} on {count} such GPUs; or "
            + refusal.fix[0].lower()
            + refusal.fix[1:],
        ) from None
