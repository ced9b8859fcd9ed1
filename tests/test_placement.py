"""A worker's model across several devices (executor.gpus_per_worker): the placement plan, worked by hand,
and the same code path on the CPU, where it must score exactly what a one-device worker scores."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.executor.memory import Shapes, plan_memory, plan_shapes
from evomerge.executor.placement import device_map, module_of, place_modules
from evomerge.executor.reserve import reserve_on_devices
from evomerge.executor.worker import Worker, _devices
from evomerge.methods import get_method
from evomerge.recipe.dataflow import DataFlowRecipe, PathStep
from tests.test_executor_ray import recipe, spec  # noqa: F401  (spec is a fixture)


def test_layers_split_in_contiguous_blocks_balanced_by_bytes():
    # Embeddings 10 bytes, four layers of 20, norm 1, head 10: 101 in all. A layer goes to device
    # floor(2 * midpoint / 101): layer 0 (midpoint 20) and 1 (40) to the first, 2 (60) and 3 (80) to the second.
    sizes = {"model.embed_tokens": 10, **{f"model.layers.{i}": 20 for i in range(4)}, "model.norm": 1, "lm_head": 10}
    placed = place_modules(sizes, ["cuda:0", "cuda:1"])
    assert placed == {
        "model.embed_tokens": "cuda:0",
        "model.layers.0": "cuda:0",
        "model.layers.1": "cuda:0",
        "model.layers.2": "cuda:1",
        "model.layers.3": "cuda:1",
        "model.norm": "cuda:1",
        "lm_head": "cuda:1",
    }
    loads = {d: sum(sizes[m] for m, where in placed.items() if where == d) for d in ("cuda:0", "cuda:1")}
    assert loads == {"cuda:0": 50, "cuda:1": 51}
    # A tied head is the embedding: it stays on its device.
    assert place_modules(sizes, ["cuda:0", "cuda:1"], tied_head=True)["lm_head"] == "cuda:0"
    # Three devices, twelve equal layers and light ends: four layers each, in order.
    even = {"model.embed_tokens": 1, **{f"model.layers.{i}": 10 for i in range(12)}, "model.norm": 1, "lm_head": 1}
    blocks = [place_modules(even, ["a", "b", "c"])[f"model.layers.{i}"] for i in range(12)]
    assert blocks == ["a"] * 4 + ["b"] * 4 + ["c"] * 4


def test_the_device_map_orders_layers_by_index_not_by_name():
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in (0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9)]
    names += ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    checkpoint = SimpleNamespace(names=names, shape=lambda name: (4, 4), config={"tie_word_embeddings": False})
    placed = device_map(checkpoint, ["a", "b"], itemsize=2)
    assert [placed[f"model.layers.{i}"] for i in range(12)] == ["a"] * 6 + ["b"] * 6
    assert module_of("model.layers.10.self_attn.q_proj.weight") == "model.layers.10"
    assert module_of("model.norm.weight") == "model.norm"


def test_a_worker_spanning_two_cpu_slots_scores_what_one_device_scores(spec, toy_world):  # noqa: F811
    candidate = recipe(toy_world, 0.7, 0.4)
    one = Worker(spec).evaluate(candidate)
    two = Worker(dataclasses.replace(spec, gpus_per_worker=2)).evaluate(candidate)
    assert one.error is None and two.metrics == one.metrics


def test_a_data_flow_worker_does_not_span_devices(spec, toy_world):  # noqa: F811
    path = DataFlowRecipe(sources=(str(toy_world.base),), path=(PathStep(source=0, layer=0),), embedding_source=0)
    with pytest.raises(EvomergeError, match="gpus_per_worker=1 with genome=dfs"):
        Worker(dataclasses.replace(spec, template=path, gpus_per_worker=2))


# A model small enough to place by hand: embedding and head of 1,000 entries, two layers of 1,000, a norm of 10.
SHAPES = Shapes(
    {
        "model.embed_tokens.weight": (100, 10),
        "model.layers.0.mlp.weight": (100, 10),
        "model.layers.1.mlp.weight": (100, 10),
        "model.norm.weight": (10,),
        "lm_head.weight": (100, 10),
    },
    {"tie_word_embeddings": False},
)


@pytest.mark.parametrize(
    ("free", "tier"),
    [
        # Layer 0 goes with the embedding (midpoint 1,500 of 4,010), layer 1 with the norm and head: 2,000 and
        # 2,010 entries, 3 float32 copies each (model and two sources): 24,000 and 24,120 bytes, and 8,000 of
        # temporaries (a 1,000-entry tensor's two inputs). The logits' 10,000 sit on the head's device. 90,000
        # free in all holds the 74,820 needed, but only where the larger device holds the head: else that one
        # takes the disk tier (model 8,040, streamed tensor 8,000, temporaries 8,000, reserve 10,350).
        ({"cuda:1": 40_000, "cuda:2": 50_000}, "resident"),
        ({"cuda:1": 50_000, "cuda:2": 40_000}, "disk"),
    ],
)
def test_each_device_holds_its_share_and_the_head_holds_the_logits(free, tier):
    reserve = {"KV cache": 600, "logits": 10_000, "activations": 50}
    plan = plan_shapes(
        SHAPES,
        method=get_method("linear"),
        sources=2,
        experts=2,
        dtype="float32",
        free=free,
        host_free=0,
        reserve=reserve,
    )
    assert plan.tier == tier
    assert {d: parts["reserve"] for d, parts in plan.shares.items()} == {
        "cuda:1": 300 + 50,
        "cuda:2": 300 + 50 + 10_000,
    }
    if tier == "resident":
        assert plan.shares["cuda:1"] == {"model": 8_000, "sources": 16_000, "temporaries": 8_000, "reserve": 350}
        assert plan.shares["cuda:2"] == {"model": 8_040, "sources": 16_080, "temporaries": 8_000, "reserve": 10_350}
        assert plan.headroom_on("cuda:2") == 50_000 - 32_120 and not plan.short


def test_a_tied_head_puts_the_logits_on_the_embeddings_device():
    tied = [name for name in SHAPES.names if name != "lm_head.weight"]
    placed = {
        "model.embed_tokens": "cuda:0",
        "model.layers.0": "cuda:0",
        "model.layers.1": "cuda:1",
        "model.norm": "cuda:1",
    }
    shares = reserve_on_devices(
        {"KV cache": 600, "logits": 10_000, "activations": 50}, {**placed, "lm_head": "cuda:0"}, tied
    )
    assert shares == {"cuda:0": 300 + 50 + 10_000, "cuda:1": 300 + 50}
    # A reserve the user gives as one number is kept on every device.
    assert reserve_on_devices(7, {**placed, "lm_head": "cuda:0"}, tied) == {"cuda:0": 7, "cuda:1": 7}


def test_a_worker_spans_the_gpus_from_the_one_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert _devices(torch.device("cuda:1"), 2) == ["cuda:1", "cuda:2"]
    assert _devices(torch.device("cuda"), 2) == ["cuda:0", "cuda:1"]
    assert _devices(torch.device("cpu"), 2) == ["cpu", "cpu"]
    with pytest.raises(EvomergeError, match="needs cuda:3 to cuda:4, but this machine has 4 GPU"):
        _devices(torch.device("cuda:3"), 2)


def test_the_plan_asks_each_spanned_gpu_for_its_own_free_memory(toy_world, monkeypatch):
    """cuda:1 with 2 GPUs per worker: cuda:1 and cuda:2 are asked, each checked against its own figure."""
    from tests.test_executor_memory import recipe as memory_recipe

    asked = []
    free = {"cuda:1": 10**9, "cuda:2": 10**9}
    monkeypatch.setattr(
        "evomerge.executor.memory.free_bytes", lambda device: asked.append(str(device)) or free[str(device)]
    )
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    template = memory_recipe(toy_world, "task_arithmetic")
    plan = plan_memory(
        template, device=torch.device("cuda:1"), devices=_devices(torch.device("cuda:1"), 2), dtype="float32", reserve=0
    )
    assert asked == ["cuda:1", "cuda:2"] and set(plan.shares) == {"cuda:1", "cuda:2"}
