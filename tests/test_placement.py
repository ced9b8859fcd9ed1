"""A worker's model across several devices (executor.gpus_per_worker): the placement plan, worked by hand,
and the same code path on the CPU, where it must score exactly what a one-device worker scores."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from evomerge.errors import EvomergeError
from evomerge.executor.placement import device_map, module_of, place_modules
from evomerge.executor.worker import Worker
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
