"""A worker's memory check counts what the merge method keeps beside the sources, not the sources alone."""

from __future__ import annotations

import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.executor.memory import plan_memory, precompute_bytes, resident_bytes
from evomerge.recipe.recipe import Recipe

# The tiny Llama's tensors hold 27,744 entries in all (tests/test_executor_ray.py works them out); the largest,
# its embedding and head, 111 x 32.
ENTRIES = 27_744
LARGEST = 111 * 32


def recipe(toy_world, method: str) -> Recipe:
    knobs = {"weight": 1.0} if method == "task_arithmetic" else {"weight": 1.0, "density": 0.5}
    experts = [{"model": str(toy_world.experts[name]), **knobs} for name in ("math", "lang")]
    return Recipe.from_plain({"method": method, "base": str(toy_world.base), "models": experts, "dtype": "float32"})


@pytest.mark.parametrize(
    ("method", "device", "dtype", "per_entry"),
    [
        # TIES: a sorted copy of each task vector's magnitudes (float32 on CPU, where 16-bit ones are
        # sorted as float32) and its int32 sort order.
        ("ties", "cpu", "float32", 4 + 4),
        ("ties", "cpu", "bfloat16", 4 + 4),
        ("ties", "cuda", "bfloat16", 2 + 4),
        # DARE keeps its draws on CPU only, a float32 word per entry per model (the whole 24-bit number
        # torch's Bernoulli compares, so any density draws exactly); on a GPU it draws per candidate.
        ("dare_ties", "cpu", "bfloat16", 4),
        ("dare_ties", "cuda", "bfloat16", 0),
        ("task_arithmetic", "cpu", "float32", 0),
    ],
)
def test_precompute_bytes_per_method_device_and_dtype(toy_world, method, device, dtype, per_entry):
    template = recipe(toy_world, method)
    assert precompute_bytes(template, device=torch.device(device), dtype=dtype) == 2 * ENTRIES * per_entry


def test_a_ties_worker_that_fits_its_sources_but_not_its_sorted_magnitudes_merges_without_them(toy_world, monkeypatch):
    template = recipe(toy_world, "ties")
    sources, copies = resident_bytes(template, "float32")
    assert (sources, copies) == (ENTRIES * 4 * 4, 4)  # working model, base, two task vectors
    # Beside what is kept, the largest tensor's 3 inputs as read (loading), or, the larger, its 2 task vectors'
    # sorted magnitudes and orders before they are stacked with one sort's float32 keys and int64 order.
    needed = sources + 2 * ENTRIES * 8 + LARGEST * (2 * 8 + 12)
    monkeypatch.setattr("evomerge.executor.memory.free_bytes", lambda device: needed - 1)
    plan = plan_memory(template, device=torch.device("cpu"), dtype="float32", reserve=0)
    assert (plan.tier, plan.precompute) == ("resident", False)
    monkeypatch.setattr("evomerge.executor.memory.free_bytes", lambda device: needed)
    plan = plan_memory(template, device=torch.device("cpu"), dtype="float32", reserve=0)
    assert (plan.tier, plan.precompute, plan.device_parts["precompute"]) == ("resident", True, 2 * ENTRIES * 8)
    # Not even the model and one tensor's inputs: refused, with what each tier needs.
    monkeypatch.setattr("evomerge.executor.memory.free_bytes", lambda device: ENTRIES * 4)
    with pytest.raises(EvomergeError, match="fits no memory tier: resident with precompute needs"):
        plan_memory(template, device=torch.device("cpu"), dtype="float32", reserve=0)


def test_a_restarted_worker_waits_for_its_device_memory_to_come_free(monkeypatch):
    """A worker restarted after a kill may find the memory of the process it replaces not yet given back:
    it retries the memory check for a while instead of stopping the search. A first start does not wait,
    and no other startup error is retried."""
    pytest.importorskip("ray")
    from evomerge.executor import ray_pool
    from evomerge.executor.memory import SourcesDoNotFit

    attempts = []

    def worker(spec, failures=2, error=SourcesDoNotFit):
        attempts.append(spec)
        if len(attempts) <= failures:
            raise error("the worker on cuda needs 10 bytes but only 5 are free", "free some memory")
        return "a worker"

    monkeypatch.setattr(ray_pool.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(ray_pool, "Worker", worker)
    assert ray_pool.start_worker("spec", patience_s=60.0) == "a worker" and len(attempts) == 3
    attempts.clear()
    with pytest.raises(SourcesDoNotFit):
        ray_pool.start_worker("spec", patience_s=0.0)
    assert len(attempts) == 1
    attempts.clear()
    monkeypatch.setattr(ray_pool, "Worker", lambda spec: worker(spec, error=EvomergeError))
    with pytest.raises(EvomergeError):
        ray_pool.start_worker("spec", patience_s=60.0)
    assert len(attempts) == 1


def test_temporaries_kept_by_a_raised_malloc_trim_threshold_are_counted_on_a_cpu(toy_world, monkeypatch):
    """glibc keeps freed blocks up to MALLOC_TRIM_THRESHOLD_ for reuse: the temporaries count twice, up to it."""
    template = recipe(toy_world, "task_arithmetic")
    monkeypatch.setattr("evomerge.executor.memory.free_bytes", lambda device: 10**9)
    plan = plan_memory(template, device=torch.device("cpu"), dtype="float32", reserve=0)
    assert plan.device_parts["temporaries"] == LARGEST * 4 * 3 and "freed, kept by malloc" not in plan.device_parts
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    plan = plan_memory(template, device=torch.device("cpu"), dtype="float32", reserve=0)
    assert plan.device_parts["freed, kept by malloc"] == 1000
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", str(2**32))
    plan = plan_memory(template, device=torch.device("cpu"), dtype="float32", reserve=0)
    assert plan.device_parts["freed, kept by malloc"] == LARGEST * 4 * 3
