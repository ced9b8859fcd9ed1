"""Memory counted per node: a Ray pool is sized from each node's memory before any worker loads."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.evaluate.lm_eval_scorer import TaskSet
from evomerge.executor.memory import plan_memory
from evomerge.executor.node_memory import size_pool
from evomerge.executor.worker import WorkerSpec
from tests.test_executor_memory import ENTRIES, LARGEST, recipe


@pytest.fixture
def spec(toy_world) -> WorkerSpec:
    tasks = TaskSet(names=("toy_math",), include_path=str(toy_world.tasks_dir), limit=4)
    # TIES on a CPU, resident with its precompute: 4 float32 copies (working model, base, 2 task vectors) and
    # 2 x (4 + 4) bytes of sorted magnitudes and orders per entry, 32 bytes an entry, and the largest tensor's
    # temporaries (tests/test_executor_memory.py); no reserve.
    return WorkerSpec(template=recipe(toy_world, "ties"), tasks=tasks, reserve_bytes=0)


NEED = 32 * ENTRIES + LARGEST * (2 * 8 + 12)


def test_a_cpu_pool_takes_the_workers_each_nodes_memory_holds(spec):
    nodes = [{"CPU": 16, "memory": 3.5 * NEED}, {"CPU": 2, "memory": 10 * NEED}]
    # One worker per CPU would be 18, each loading every source; memory holds 3 on the first node, and the
    # second has 2 CPUs.
    count, sized, reserved = size_pool(spec, 18, explicit=False, nodes=nodes, threads=1)
    assert (count, sized.host_bytes, reserved) == (5, NEED, NEED)
    assert size_pool(spec, 4, explicit=True, nodes=nodes, threads=1)[0] == 4
    with pytest.raises(EvomergeError, match=r"18 worker\(s\) on device=cpu each need .* the nodes hold 5") as caught:
        size_pool(spec, 18, explicit=True, nodes=nodes, threads=1)
    assert "use executor.num_workers=5" in caught.value.fix
    # Two threads a worker: 8 slots on the first node, still 3 by memory; 1 on the second.
    assert size_pool(spec, 18, explicit=False, nodes=nodes, threads=2)[0] == 4


def test_a_cpu_pool_that_fits_no_node_is_refused_before_loading(spec):
    # Not even the disk tier (the float32 model, 4 bytes an entry, and one tensor's three inputs) fits the
    # largest node: refused in the driver, no worker started.
    with pytest.raises(EvomergeError, match="the worker on cpu fits no memory tier"):
        size_pool(
            spec, 2, explicit=False, nodes=[{"CPU": 4, "memory": 5 * ENTRIES}, {"CPU": 4, "memory": 0}], threads=1
        )


def test_gpu_workers_share_their_nodes_memory(spec):
    on_gpu = dataclasses.replace(spec, device="cuda", gpus_per_worker=2)
    nodes = [{"CPU": 64, "GPU": 8, "memory": 800}, {"CPU": 16, "GPU": 2, "memory": 100}, {"CPU": 8, "memory": 10}]
    # 4 workers on the first node (200 bytes each), 1 on the second (100); the head node without GPUs has none.
    count, sized, reserved = size_pool(on_gpu, 5, explicit=True, nodes=nodes, threads=1)
    assert (count, sized.host_bytes, reserved) == (5, 100, None)


def test_a_worker_plans_within_its_share_of_host_memory(toy_world):
    template = recipe(toy_world, "ties")
    cpu = torch.device("cpu")
    plan = plan_memory(template, device=cpu, dtype="float32", reserve=0, host_free=NEED)
    assert (plan.tier, plan.precompute) == ("resident", True)
    plan = plan_memory(template, device=cpu, dtype="float32", reserve=0, host_free=NEED - 1)
    assert (plan.tier, plan.precompute) == ("resident", False)


def test_only_nodes_with_the_workers_custom_resources_hold_them(spec):
    """executor.resources: a head node without the resource holds no worker, whatever its memory and CPUs."""
    nodes = [{"CPU": 8, "memory": 100 * NEED}, {"CPU": 8, "memory": 2.5 * NEED, "model_slot": 4}]
    count, _, _ = size_pool(spec, 8, explicit=False, nodes=nodes, threads=1, resources={"model_slot": 1})
    assert count == 2  # the second node: 4 slots, memory for 2
