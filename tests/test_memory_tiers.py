"""Memory tiers: which one a worker picks for given byte budgets, and that every tier merges the same tensors.

The resident tier keeps the sources (and a method's precompute) on the device; the host tier keeps them in
host memory and streams them in a tensor at a time; the disk tier reads them from the checkpoints per
candidate (materialize/in_place.py). On a CPU the host tier's code path runs without the copy.
"""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge.executor.memory import SourcesDoNotFit, choose_tier, plan_memory, tier_options
from evomerge.executor.reserve import default_reserve
from evomerge.io.checkpoint import Checkpoint
from evomerge.materialize.in_place import InPlaceMerger
from evomerge.materialize.to_disk import merge_to_disk
from tests.test_device_merge import CASES, models, recipe_for  # noqa: F401  (models is a fixture)

# model 100, sources 300 (three copies), precompute 200, one tensor's inputs 30, reserve 50 (bytes).
GPU = tier_options(model=100, sources=300, precompute=200, stream=30, reserve=50, device_is_host=False)


def test_each_tier_needs_what_it_keeps_worked_by_hand():
    needs = {(tier, pre): (sum(device.values()), sum(host.values())) for tier, pre, device, host in GPU}
    assert needs == {
        ("resident", True): (100 + 300 + 200 + 50, 0),
        ("resident", False): (100 + 300 + 50, 0),
        ("host", False): (100 + 2 * 30 + 50, 300),  # two tensors on the device: one merging, one arriving
        ("disk", False): (100 + 30 + 50, 0),
    }
    cpu = tier_options(model=100, sources=300, precompute=0, stream=30, reserve=50, device_is_host=True)
    assert [(tier, pre) for tier, pre, _, _ in cpu] == [("resident", False), ("disk", False)]


@pytest.mark.parametrize(
    ("device_free", "host_free", "tier", "precompute"),
    [
        (650, 0, "resident", True),
        (649, 0, "resident", False),  # the precompute is optional: the eager path runs
        (449, 300, "host", False),
        (449, 299, "disk", False),
        (180, 10**9, "disk", False),
    ],
)
def test_the_fastest_tier_that_fits_is_chosen(device_free, host_free, tier, precompute):
    plan = choose_tier(GPU, device_free=device_free, host_free=host_free)
    assert (plan.tier, plan.precompute) == (tier, precompute)
    assert plan.headroom == device_free - sum(v for k, v in plan.device_parts.items() if k != "reserve")


def test_nothing_fits_says_what_each_tier_needs_and_which_would_fit():
    with pytest.raises(SourcesDoNotFit) as caught:
        choose_tier(GPU, device_free=179, host_free=10**9, device="cuda:0")
    message = str(caught.value)
    assert "the worker on cuda:0 fits no memory tier" in message
    assert "disk needs 0.00 GiB" in message and "host needs" in message and "use dtype=bfloat16" in message
    with pytest.raises(SourcesDoNotFit, match="executor.tier=disk \\(or auto\\) fits"):
        choose_tier(GPU, device_free=400, host_free=0, forced="resident")
    assert choose_tier(GPU, device_free=10**9, host_free=10**9, forced="disk").tier == "disk"


def test_the_default_reserve_counts_kv_cache_logits_and_activations():
    config = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 100,
        "max_position_embeddings": 4096,
    }
    tokens = 8 * 4096  # batch 8 at lm-eval's default length, the model's context
    # The logits in bfloat16 and their float32 log-softmax: 2 + 4 bytes per position and token of the vocabulary.
    kv, logits, activations = 2 * 2 * 2 * 16 * tokens * 2, tokens * 100 * (2 + 4), tokens * (4 * 64 + 2 * 128) * 2
    assert default_reserve(config, dtype="bfloat16", batch_size=8, max_length=None) == kv + logits + activations
    assert (
        default_reserve(config, dtype="bfloat16", batch_size="auto", max_length=100)
        == (kv + logits + activations) // 8 // 4096 * 100
    )


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize("method", ["linear", "slerp", "task_arithmetic", "ties", "dare_ties", "della"])
def test_every_tier_merges_what_the_resident_tier_does(models, tmp_path, method, device, dtype):  # noqa: F811
    """On models whose tensors are large enough for the compiled kernels, each tier's merge equals the
    merge to disk bit for bit; the resident one also runs the method's precompute, the others its eager path.
    On a GPU (scripts/gpu_check.sh runs this file) the host tier streams from pinned memory on a side stream."""
    recipe = recipe_for(models, method, dtype)
    written = Checkpoint.open(merge_to_disk(recipe, tmp_path / "merged", device=device))
    for tier in ("resident", "host", "disk"):
        live = AutoModelForCausalLM.from_pretrained(models["base"], dtype=getattr(torch, dtype)).to(device)
        InPlaceMerger(model=live, template=recipe, tier=tier).materialize(recipe)
        params = dict(live.named_parameters())
        for name in written.names:
            assert torch.equal(params[name].cpu(), written.load(name)), (tier, name)


def test_the_disk_tier_keeps_nothing_and_frees_what_it_read(toy_world):
    """Over 100 candidates the disk tier holds no source tensor between candidates, and the tensors alive
    in the process stay the same: each candidate's inputs are freed once merged."""
    recipe = recipe_for(
        {"base": str(toy_world.base), **{k: str(v) for k, v in toy_world.experts.items()}}, "ties", "float32"
    )
    live = AutoModelForCausalLM.from_pretrained(toy_world.base, dtype=torch.float32)
    merger = InPlaceMerger(model=live, template=recipe, tier="disk")
    assert merger._resident == {}

    def tensors_alive() -> int:
        gc.collect()
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    merger.materialize(recipe)
    before = tensors_alive()
    for _ in range(100):
        merger.materialize(recipe)
    assert tensors_alive() == before


def test_a_worker_plans_its_tier_from_the_free_memory(toy_world, monkeypatch):
    recipe = recipe_for(
        {"base": str(toy_world.base), **{k: str(v) for k, v in toy_world.experts.items()}}, "ties", "float32"
    )
    entries = sum(t.numel() for t in AutoModelForCausalLM.from_pretrained(toy_world.base).state_dict().values())
    model = entries * 4
    monkeypatch.setattr("evomerge.executor.memory.free_bytes", lambda device: model * 10)
    plan = plan_memory(recipe, device=torch.device("cpu"), dtype="float32", reserve=0)
    assert (plan.tier, plan.precompute) == ("resident", True)  # 4 copies + 2 x 8 bytes per entry = 8 copies
    monkeypatch.setattr("evomerge.executor.memory.free_bytes", lambda device: model * 5)
    plan = plan_memory(recipe, device=torch.device("cpu"), dtype="float32", reserve=0)
    assert (plan.tier, plan.precompute) == ("resident", False)
    monkeypatch.setattr("evomerge.executor.memory.free_bytes", lambda device: model * 2)
    plan = plan_memory(recipe, device=torch.device("cpu"), dtype="float32", reserve=0)
    assert plan.tier == "disk" and "memory tier disk on cpu: model" in plan.describe(torch.device("cpu"))


def test_a_gpu_refusal_names_the_gpus_per_worker_that_would_fit(toy_world, monkeypatch):
    recipe = recipe_for(
        {"base": str(toy_world.base), **{k: str(v) for k, v in toy_world.experts.items()}}, "ties", "float32"
    )
    entries = sum(t.numel() for t in AutoModelForCausalLM.from_pretrained(toy_world.base).state_dict().values())
    # Resident with TIES' precompute: 4 copies of the model and 2 x 8 bytes per entry = 32 bytes an entry, 16
    # bytes an entry (less one byte) free on each GPU. Two such GPUs hold 32 in all, but not per GPU: the placement puts the
    # embedding (111 x 32 = 3,552 entries) and layer 0 (10,304) on the first, layer 1, the norm (32) and the
    # head (3,552) on the second: 13,888 of 27,744 entries, 32 bytes over. Three put layer 1 and the head on
    # the last (a layer goes to floor(N x midpoint / total)); four hold 3,552 / 10,304 / 10,304 / 3,584 entries.
    assert entries == 27_744
    monkeypatch.setattr("evomerge.executor.memory.free_bytes", lambda device: entries * 16 - 1)
    with pytest.raises(SourcesDoNotFit, match="executor.gpus_per_worker=4 would hold it resident on 4 such GPUs"):
        plan_memory(recipe, device=torch.device("cuda"), dtype="float32", reserve=0, tier="resident")


def test_a_default_reserve_that_fits_no_tier_gives_way_and_the_plan_says_so(toy_world, monkeypatch):
    """The default reserve is a worst case (full-length batches): where no tier fits with it, the fastest
    tier that fits without it runs, and the log says the headroom is short. A reserve the user set holds."""
    recipe = recipe_for(
        {"base": str(toy_world.base), **{k: str(v) for k, v in toy_world.experts.items()}}, "ties", "float32"
    )
    entries = sum(t.numel() for t in AutoModelForCausalLM.from_pretrained(toy_world.base).state_dict().values())
    model = entries * 4
    monkeypatch.setattr("evomerge.executor.memory.free_bytes", lambda device: model * 5)
    plan = plan_memory(recipe, device=torch.device("cpu"), dtype="float32", reserve=model * 10, reserve_required=False)
    assert (plan.tier, plan.precompute, plan.short) == ("resident", False, True)  # 4 copies of 5 free
    # The headroom is what the largest tensor's 3 inputs as read (111 x 32 entries each) leave of the fifth copy.
    assert plan.headroom == model - 111 * 32 * 4 * 3 and "below the reserve" in plan.describe(torch.device("cpu"))
    with pytest.raises(SourcesDoNotFit, match="fits no memory tier"):
        plan_memory(recipe, device=torch.device("cpu"), dtype="float32", reserve=model * 10)
