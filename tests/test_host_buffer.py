"""The host memory tier: its sources sit in one buffer whose bytes are those the memory plan counts (and
those page-locked on a GPU machine), and its copies to the GPU are ordered against the merges on the
compute stream. Both are checked on the CPU: the layout is a function of the shapes, and the streams are
a recording fake."""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge.executor.memory import plan_memory, resident_bytes
from evomerge.materialize import in_place
from evomerge.materialize.host_buffer import HostBuffer, layout
from evomerge.materialize.in_place import InPlaceMerger
from evomerge.recipe.recipe import Recipe


def test_the_layout_puts_each_tensors_inputs_back_to_back_worked_by_hand():
    # a: a base of 2x3 (6 entries) and two stacked 2x3 (12); b: no base, three stacked 4-vectors (12).
    spans, entries = layout({"a": ((2, 3), (2, 2, 3)), "b": (None, (3, 4))})
    assert spans == {"a": ((0, 6), (6, 12)), "b": (None, (18, 12))}
    assert entries == 30
    buffer = HostBuffer({"a": ((2, 3), (2, 2, 3)), "b": (None, (3, 4))}, dtype=torch.bfloat16)
    assert buffer.nbytes == 30 * 2
    base, stacked = buffer.views("b")
    assert base is None and stacked.shape == (3, 4)
    assert stacked.data_ptr() == buffer.tensor.data_ptr() + 18 * 2


def toy_recipe(world, method: str) -> Recipe:
    """TIES keeps a base and task vectors; linear takes no base (its buffer holds the stacked models only)."""
    density = {"density": 0.5} if method == "ties" else {}
    return Recipe.from_plain(
        {
            "method": method,
            "base": str(world.base),
            "models": [
                {"model": str(world.experts["math"]), "weight": 0.6, **density},
                {"model": str(world.experts["lang"]), "weight": 0.4, **density},
            ],
            "dtype": "float32",
        }
    )


class RecordingCudart:
    """``torch.cuda.cudart()``'s register calls, recorded instead of made."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def cudaHostRegister(self, pointer: int, size: int, flags: int) -> int:  # noqa: N802 - CUDA's name
        self.calls.append(("register", pointer, size, flags))
        return 0

    def cudaHostUnregister(self, pointer: int) -> int:  # noqa: N802
        self.calls.append(("unregister", pointer))
        return 0


@pytest.mark.parametrize("method", ["ties", "linear"])
def test_the_host_tier_pins_exactly_the_bytes_its_plan_counts(toy_world, monkeypatch, method):
    """The plan for a GPU whose free memory holds the host tier but not the resident one counts the sources
    in host memory; the merger keeps them all as views of one buffer of exactly those bytes, which is what
    gets page-locked, once (tensor by tensor, PyTorch's pinned allocator rounded each up to a power of two)."""
    recipe = toy_recipe(toy_world, method)
    total, copies = resident_bytes(recipe, "float32")
    model = total // copies
    monkeypatch.setattr("evomerge.executor.memory.free_bytes", lambda device: total - 1)  # resident needs total
    plan = plan_memory(recipe, device=torch.device("cuda"), dtype="float32", reserve=0)
    assert plan.tier == "host" and plan.host_parts == {"sources": total - model}

    live = AutoModelForCausalLM.from_pretrained(toy_world.base, dtype=torch.float32)
    merger = InPlaceMerger(model=live, template=recipe, tier="host")
    buffer = merger._host
    assert buffer.nbytes == plan.host_parts["sources"]
    start, end = buffer.tensor.data_ptr(), buffer.tensor.data_ptr() + buffer.nbytes
    kept = [t for pair in merger._resident.values() for t in pair if t is not None]
    assert sum(t.numel() * t.element_size() for t in kept) == buffer.nbytes
    assert all(start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= end for t in kept)

    cudart = RecordingCudart()
    buffer.pin(cudart)
    assert cudart.calls == [("register", start, plan.host_parts["sources"], 1)]  # portable: for every GPU
    del merger, buffer, kept
    gc.collect()
    assert cudart.calls[1:] == [("unregister", start)]  # unlocked once the merger is gone


def test_the_host_tier_merges_from_its_buffer_what_the_resident_tier_does(toy_world):
    recipe = toy_recipe(toy_world, "ties")
    merged = {}
    for tier in ("resident", "host"):
        live = AutoModelForCausalLM.from_pretrained(toy_world.base, dtype=torch.float32)
        InPlaceMerger(model=live, template=recipe, tier=tier).materialize(recipe)
        merged[tier] = {name: p.detach().clone() for name, p in live.named_parameters()}
    assert merged["host"].keys() == merged["resident"].keys()
    assert all(torch.equal(merged["host"][n], merged["resident"][n]) for n in merged["host"])


class RecordingStreams:
    """A stand-in for ``torch.cuda``'s streams: one compute stream, side streams, and a log of the waits,
    of entering and leaving a stream, and of the merges the caller runs (``torch.cuda.stream`` makes its
    stream the current one, as the real one does)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, ...]] = []
        self.current = self.Named(self, "compute")

    class Named:
        def __init__(self, streams: RecordingStreams, name: str) -> None:
            self.streams, self.name = streams, name

        def wait_stream(self, other: RecordingStreams.Named) -> None:
            self.streams.log.append(("wait", self.name, other.name))

    def Stream(self, device: torch.device) -> Named:  # noqa: N802 - torch.cuda's name
        return self.Named(self, "side")

    def current_stream(self, device: torch.device) -> Named:
        return self.current

    @contextlib.contextmanager
    def stream(self, stream: Named):
        before, self.current = self.current, stream
        self.log.append(("enter", stream.name))
        yield
        self.log.append(("leave", stream.name))
        self.current = before


def test_a_copy_waits_for_the_merges_before_it_and_a_merge_for_its_copy():
    streams = RecordingStreams()
    kept = {"a": (None, torch.zeros(2)), "b": (torch.zeros(1), torch.zeros(2))}
    devices = dict.fromkeys(kept, torch.device("cpu"))
    for name, _pair in in_place._streamed(kept, devices, cuda=streams):
        streams.log.append(("merge", name))
    copy = [("wait", "side", "compute"), ("enter", "side"), ("leave", "side")]
    use = [("wait", "compute", "side")]
    assert streams.log == [*copy, *use, *copy, ("merge", "a"), *use, ("merge", "b")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locking needs CUDA (scripts/gpu_check.sh runs this)")
def test_on_a_gpu_the_buffer_itself_is_page_locked_and_streams_the_same_merge(toy_world):
    recipe = toy_recipe(toy_world, "ties")
    total, copies = resident_bytes(recipe, "float32")
    merged = {}
    for tier in ("resident", "host"):
        live = AutoModelForCausalLM.from_pretrained(toy_world.base, dtype=torch.float32).to("cuda")
        merger = InPlaceMerger(model=live, template=recipe, tier=tier)
        merger.materialize(recipe)
        merged[tier] = {name: p.detach().cpu() for name, p in live.named_parameters()}
    assert merger._host.tensor.is_pinned() and merger._host.nbytes == total - total // copies
    assert all(torch.equal(merged["host"][n], merged["resident"][n]) for n in merged["host"])
