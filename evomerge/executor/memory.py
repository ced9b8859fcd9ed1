"""Will a worker's sources fit its devices? Asked before loading, so a too-small device fails in a second
with the numbers, instead of minutes later with an out-of-memory kill that reads like a crash.

The plan works from shapes alone (a checkpoint's header, or a model built on torch's ``meta`` device), so
a 70B plan needs no weights and no GPU (scripts/memory_plans.py). A model placed across several devices
(``executor.gpus_per_worker``) is planned device by device: each holds its layers' share of the model,
sources and precompute, and its part of the reserve (the float32 logits on the head's device), checked
against that device's own free memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psutil
import torch

from evomerge.dtypes import torch_dtype
from evomerge.errors import EvomergeError
from evomerge.executor.placement import device_map, module_of
from evomerge.executor.reserve import reserve_on_devices
from evomerge.io.checkpoint import Checkpoint
from evomerge.materialize.plan import validate
from evomerge.materialize.sources import HEAD, MergeSources
from evomerge.methods import MergeMethod
from evomerge.recipe.dataflow import DataFlowRecipe
from evomerge.recipe.recipe import Recipe

Parts = dict[str, int]
Option = tuple[str, bool, dict[str, Parts], Parts]  # tier, precompute, each device's parts, host parts


@dataclass(frozen=True)
class Shapes:
    """A model's tensor names and shapes, in its order, and its config: all a plan reads of it."""

    shapes: dict[str, tuple[int, ...]]
    config: dict

    @classmethod
    def of(cls, checkpoint) -> Shapes:
        """A checkpoint's (its header: no tensor is read)."""
        return cls({name: tuple(checkpoint.shape(name)) for name in checkpoint.names}, dict(checkpoint.config))

    @classmethod
    def of_model(cls, model: torch.nn.Module) -> Shapes:
        """A built model's parameters, e.g. on the meta device. A tied head is the embedding, counted once
        (``named_parameters`` lists a shared parameter once), as a tied checkpoint stores it."""
        return cls({name: tuple(p.shape) for name, p in model.named_parameters()}, model.config.to_dict())

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def entries(self, names: Sequence[str] | None = None) -> int:
        return sum(math.prod(self.shapes[name]) for name in (self.names if names is None else names))


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=torch_dtype(dtype)).element_size()


def resident_bytes(template: Recipe | DataFlowRecipe, dtype: str) -> tuple[int, int]:
    """``(bytes, copies)`` a worker keeps resident. A PS worker holds the working model plus the base and
    every expert as the method reads them (task vectors or raw tensors), each a full copy of the model's
    tensors; a DFS worker holds each source model once (paths reference their layers, never copy them)."""
    if isinstance(template, DataFlowRecipe):
        checkpoints = [Checkpoint.open(source) for source in template.sources]
        return sum(Shapes.of(c).entries() for c in checkpoints) * _itemsize(dtype), len(checkpoints)
    sources = MergeSources.open(template, validate(template))
    copies = 1 + len(sources.all)
    return Shapes.of(sources.reference).entries() * _itemsize(dtype) * copies, copies


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
    entries = Shapes.of(MergeSources.open(template, method).reference).entries()
    return entries * method.precompute_bytes(device, torch_dtype(dtype), len(template.models))


class SourcesDoNotFit(EvomergeError):
    """The device lacks the free memory for a worker in any memory tier (see ``plan_memory``)."""


# The memory tiers in the order a worker prefers them (materialize/in_place.py says what each keeps where).
TIERS = ("resident", "host", "disk")


@dataclass(frozen=True)
class MemoryPlan:
    """A worker's memory tier and the bytes each part takes on each of its devices, and in host memory."""

    tier: str
    precompute: bool  # whether the method keeps its precompute (resident only)
    shares: dict[str, Parts]  # device -> part -> bytes
    host_parts: Parts
    free: dict[str, int]  # device -> its free bytes
    host_free: int

    @property
    def device_parts(self) -> Parts:
        """Each part's bytes summed over the devices."""
        total: Parts = {}
        for parts in self.shares.values():
            for name, value in parts.items():
                total[name] = total.get(name, 0) + value
        return total

    @property
    def device_free(self) -> int:
        return sum(self.free.values())

    def headroom_on(self, device: str) -> int:
        """What ``device`` keeps free for the KV cache and activations: its free memory less everything but
        the reserve, which is the headroom's floor."""
        return self.free[device] - sum(v for k, v in self.shares[device].items() if k != "reserve")

    @property
    def headroom(self) -> int:
        """The least headroom of the worker's devices."""
        return min(self.headroom_on(device) for device in self.shares)

    @property
    def short(self) -> bool:
        """Whether a device's headroom is below its reserve (a default reserve that did not fit)."""
        return any(self.headroom_on(d) < parts.get("reserve", 0) for d, parts in self.shares.items())

    def describe(self, device: torch.device | str) -> str:
        kept = " with the method's precompute" if self.precompute else ""
        where = []
        for name, parts in self.shares.items():
            listed = ", ".join(f"{part} {value / 2**30:.2f} GiB" for part, value in parts.items())
            where.append(
                f"{listed}{'' if len(self.shares) == 1 else f' on {name}'}; headroom for KV cache and activations "
                f"{self.headroom_on(name) / 2**30:.2f} GiB of {self.free[name] / 2**30:.2f} GiB free"
            )
        host = ", ".join(f"{name} {value / 2**30:.2f} GiB" for name, value in self.host_parts.items())
        return (
            f"memory tier {self.tier}{kept} on {device}: {' | '.join(where)}"
            f"{f'; in host memory: {host}' if host else ''}"
            + (
                "; below the reserve: long batches may run out of memory (lower tasks.batch_size, set "
                "tasks.model_args.max_length to the tasks' length, or set executor.reserve_bytes)"
                if self.short
                else ""
            )
        )


def tier_options(
    *,
    model: int,
    sources: int,
    precompute: int,
    stream: int,
    reserve: int,
    device_is_host: bool,
    temporaries: int = 0,
    precompute_temporaries: int = 0,
) -> list[tuple[str, bool, Parts, Parts]]:
    """Each way one device can keep its sources, fastest first: ``(tier, precompute, device parts, host parts)``.

    ``model``: the working model; ``sources``: every source copy the method reads; ``precompute``: what the
    method keeps to merge fast; ``stream``: one tensor's inputs (the largest), which the host and disk tiers
    hold on the device while it merges; ``reserve``: the KV cache and activations; ``temporaries``: what
    loading and merging the largest tensor takes beside what is kept, and ``precompute_temporaries`` what
    computing its precompute takes. On a CPU the host tier is the resident one (host memory is the
    device's), so it is not offered.
    """
    options = []
    if precompute:
        kept = {"model": model, "sources": sources, "precompute": precompute}
        # Loading runs at start, the precompute at the first candidate: the larger of the two at once.
        options.append(("resident", True, {**kept, "temporaries": max(temporaries, precompute_temporaries)}, {}))
    options.append(("resident", False, {"model": model, "sources": sources, "temporaries": temporaries}, {}))
    if not device_is_host:
        streamed = {"model": model, "streamed tensors": 2 * stream, "temporaries": temporaries}
        options.append(("host", False, streamed, {"sources": sources}))
    options.append(("disk", False, {"model": model, "streamed tensor": stream, "temporaries": temporaries}, {}))
    return [(tier, pre, {**device, "reserve": reserve}, host) for tier, pre, device, host in options]


def _gib(value: int) -> str:
    return f"{value / 2**30:.2f} GiB"


def choose_tier(
    options: Sequence[Option] | Sequence[tuple[str, bool, Parts, Parts]],
    *,
    device_free: int | Mapping[str, int],
    host_free: int,
    forced: str = "auto",
    device: str = "the device",
) -> MemoryPlan:
    """The first option that fits every device (of tier ``forced`` unless auto); else a one-paragraph
    refusal with each tier's needs, naming the tier that would fit where one was forced. One device's
    options (``tier_options``) take its free bytes as a number."""
    if not isinstance(device_free, Mapping):
        device_free = {device: device_free}
        options = [(tier, pre, {device: parts}, host) for tier, pre, parts, host in options]
    plans = [MemoryPlan(t, pre, dict(shares), host, dict(device_free), host_free) for t, pre, shares, host in options]
    fitting = [
        plan
        for plan in plans
        if all(sum(parts.values()) <= plan.free[d] for d, parts in plan.shares.items())
        and sum(plan.host_parts.values()) <= host_free
    ]
    chosen = [plan for plan in fitting if forced in ("auto", plan.tier)]
    if chosen:
        return chosen[0]
    many = len(device_free) > 1

    def needs(plan: MemoryPlan) -> str:
        on = ", ".join(f"{_gib(sum(parts.values()))}{f' on {d}' if many else ''}" for d, parts in plan.shares.items())
        host = f" there and {_gib(sum(plan.host_parts.values()))} of host memory" if plan.host_parts else ""
        return f"{plan.tier}{' with precompute' if plan.precompute else ''} needs {on}{host}"

    free = ", ".join(f"{_gib(v)}{f' on {d}' if many else ''}" for d, v in device_free.items())
    other = f"executor.tier={fitting[0].tier} (or auto) fits; " if fitting else ""
    raise SourcesDoNotFit(
        f"the worker on {device} fits no memory tier{'' if forced == 'auto' else f' of {forced}'}: "
        + "; ".join(needs(plan) for plan in plans if forced in ("auto", plan.tier))
        + f"; {free} {'are' if not many else 'is'} free there and {_gib(host_free)} in host memory",
        f"{other}use dtype=bfloat16 (half of float32), merge fewer models, lower executor.reserve_bytes, or run on "
        "a device with more free memory",
    )


def tensor_devices(shapes: Shapes, devices: Sequence[str], *, itemsize: int) -> dict[str, str]:
    """The device of each tensor: the placement's (executor/placement.py) across ``devices``."""
    if len(set(devices)) == 1:
        return dict.fromkeys(shapes.names, devices[0])
    modules = device_map(shapes, devices, itemsize=itemsize)
    return {name: modules[module_of(name)] for name in shapes.names}


def spread_options(
    shapes: Shapes,
    *,
    method: MergeMethod,
    sources: int,
    experts: int,
    dtype: str,
    devices: Sequence[str],
    reserve: int | Parts,
) -> list[Option]:
    """``tier_options`` for each device's share of a PS worker's tensors: ``sources`` copies the method reads
    (base and task vectors, or raw tensors), ``experts`` of them in its precompute."""
    itemsize = _itemsize(dtype)
    placed = tensor_devices(shapes, devices, itemsize=itemsize)
    modules = {module_of(name): placed[name] for name in shapes.names}
    if HEAD not in shapes.shapes:
        modules["lm_head"] = placed.get("model.embed_tokens.weight", devices[-1])
    reserves = reserve_on_devices(reserve, modules, shapes.names)
    per_device = {}
    for device in dict.fromkeys(placed.values()):
        names = [name for name, where in placed.items() if where == device]
        entries = shapes.entries(names)
        kind = torch.device(device)
        largest = max(math.prod(shapes.shape(name)) for name in names)
        per_entry = method.precompute_bytes(kind, torch_dtype(dtype), experts)
        per_device[device] = tier_options(
            model=entries * itemsize,
            sources=entries * itemsize * sources,
            precompute=entries * per_entry,
            stream=largest * itemsize * sources,
            reserve=reserves.get(device, 0),
            device_is_host=kind.type == "cpu",
            # Its inputs as read, before they are stacked (the merge's own temporaries are of that size); a
            # precompute's per-model results before they are stacked, and one sort's float32 keys and int64
            # order (results/bench_memory_peak.md: 2.3 GB past the kept parts on a 262k x 256 embedding).
            temporaries=largest * itemsize * sources,
            precompute_temporaries=largest * (per_entry + 12) if per_entry else 0,
        )
        if kind.type == "cpu":
            per_device[device] = [(t, pre, _kept_by_malloc(parts), host) for t, pre, parts, host in per_device[device]]
    first = next(iter(per_device.values()))
    options = []
    for index, (tier, pre, _, _) in enumerate(first):
        host: Parts = {}
        for device_options in per_device.values():
            for name, value in device_options[index][3].items():
                host[name] = host.get(name, 0) + value
        options.append((tier, pre, {d: opts[index][2] for d, opts in per_device.items()}, host))
    return options


def _kept_by_malloc(parts: Parts) -> Parts:
    """``parts`` and, where ``MALLOC_TRIM_THRESHOLD_`` is raised (scripts/gpu_check.sh raises it for speed),
    the temporaries again, up to it: glibc then keeps freed blocks for reuse instead of giving them back
    (results/bench_memory_peak.md: 1.4-2.1 GB more at the peak with the thresholds raised)."""
    threshold = int(os.environ.get("MALLOC_TRIM_THRESHOLD_") or 0)
    kept = min(threshold, parts.get("temporaries", 0))
    return {**parts, "freed, kept by malloc": kept} if kept else parts


def plan_shapes(
    shapes: Shapes,
    *,
    method: MergeMethod,
    sources: int,
    experts: int,
    dtype: str,
    free: Mapping[str, int],
    host_free: int,
    reserve: int | Parts,
    tier: str = "auto",
    reserve_required: bool = True,
) -> MemoryPlan:
    """The tier a PS worker uses on the devices of ``free`` (device -> its free bytes, in placement order):
    ``plan_memory`` from shapes alone. ``reserve_required`` false (the default reserve, a worst case of
    full-length batches): where no tier fits with it, the fastest that fits without it is used and the
    plan says the headroom is short."""
    if tier not in ("auto", *TIERS):
        raise EvomergeError(f"executor.tier={tier} is not a memory tier", f"use auto or one of {', '.join(TIERS)}")
    devices = list(free)
    common = dict(method=method, sources=sources, experts=experts, dtype=dtype, devices=devices)
    options = spread_options(shapes, **common, reserve=reserve)
    where = devices[0] if len(devices) == 1 else "+".join(devices)
    try:
        return choose_tier(options, device_free=dict(free), host_free=host_free, forced=tier, device=where)
    except SourcesDoNotFit as refusal:
        if not reserve_required:
            relaxed = spread_options(shapes, **common, reserve=0)
            try:
                plan = choose_tier(relaxed, device_free=dict(free), host_free=host_free, forced=tier, device=where)
                reserves = {d: parts["reserve"] for d, parts in options[0][2].items()}
                shares = {d: {**parts, "reserve": reserves[d]} for d, parts in plan.shares.items()}
                return MemoryPlan(plan.tier, plan.precompute, shares, plan.host_parts, plan.free, plan.host_free)
            except SourcesDoNotFit:
                pass
        if torch.device(devices[0]).type != "cuda" or not min(free.values()):
            raise
        count = gpus_needed(shapes, **common, reserve=reserve, free_each=min(free.values()))
        hint = (
            f"executor.gpus_per_worker={count} would hold it {options[0][0]} on {count} such GPUs; or " if count else ""
        )
        raise SourcesDoNotFit(refusal.problem, hint + refusal.fix[0].lower() + refusal.fix[1:]) from None


def gpus_needed(
    shapes: Shapes,
    *,
    method: MergeMethod,
    sources: int,
    experts: int,
    dtype: str,
    devices: Sequence[str],
    reserve: int | Parts,
    free_each: int,
    most: int = 64,
) -> int | None:
    """The fewest GPUs with ``free_each`` bytes free that hold the fastest tier, the model placed across them
    as a worker places it (so the reserve's logits on the last one count there); None past ``most``."""
    for count in range(1, most + 1):
        spread = [f"cuda:{i}" for i in range(count)]
        options = spread_options(
            shapes, method=method, sources=sources, experts=experts, dtype=dtype, devices=spread, reserve=reserve
        )
        if all(sum(parts.values()) <= free_each for parts in options[0][2].values()):
            return count
    return None


def plan_memory(
    template: Recipe | DataFlowRecipe,
    *,
    device: torch.device,
    dtype: str,
    reserve: int | Parts,
    tier: str = "auto",
    devices: Sequence[str] | None = None,
    reserve_required: bool = True,
    host_free: int | None = None,
) -> MemoryPlan:
    """The tier a worker uses for ``template``'s sources on ``device`` (``tier``: auto, or one forced), its
    model placed across ``devices`` where several are given. ``host_free``: the host memory this worker may
    take (its share of a node's RAM; None: what the OS reports available)."""
    host = psutil.virtual_memory().available if host_free is None else host_free
    spanned = list(dict.fromkeys(str(torch.device(d)) for d in devices or [device]))
    # A worker on a CPU given its share of host memory plans within it: host memory is its device's too.
    free = {d: host if host_free is not None and d == "cpu" else free_bytes(torch.device(d)) for d in spanned}
    if isinstance(template, DataFlowRecipe):  # paths run the sources' own layers: they stay resident
        if tier not in ("auto", *TIERS):
            raise EvomergeError(f"executor.tier={tier} is not a memory tier", f"use auto or one of {', '.join(TIERS)}")
        total = reserve if isinstance(reserve, int) else sum(reserve.values())
        options = [
            ("resident", False, {spanned[0]: {"sources": resident_bytes(template, dtype)[0], "reserve": total}}, {})
        ]
        return choose_tier(options, device_free=free, host_free=host, device=spanned[0])
    method = validate(template)
    sources = MergeSources.open(template, method)
    shapes = Shapes({n: sources.shape(n) for n in sources.reference.names}, sources.config)
    return plan_shapes(
        shapes,
        method=method,
        sources=len(sources.all),
        experts=len(template.models),
        dtype=dtype,
        free=free,
        host_free=host,
        reserve=reserve,
        tier=tier,
        reserve_required=reserve_required,
    )
