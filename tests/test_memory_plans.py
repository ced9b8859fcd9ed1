"""Memory plans at real sizes, without weights: the published config.json of each family users merge at size
(tests/data/configs), built on torch's meta device, planned by the code a worker runs at start."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from evomerge.executor.memory import Shapes, plan_shapes
from evomerge.executor.reserve import requests_reserve, reserve_parts
from evomerge.methods import get_method

CONFIGS = Path(__file__).parent / "data" / "configs"
PRESET = Path(__file__).resolve().parents[1] / "evomerge" / "conf" / "preset" / "mistral_ja_math.yaml"
GIB = 2**30
H100, H200 = int(78.5 * GIB), int(139.0 * GIB)  # free once a CUDA context is up (scripts/memory_plans.py)
# Published parameter counts (the model cards' 7.24B, 8.03B, ...): the configs are the real ones.
PARAMETERS = {
    "Mistral-7B-v0.1": 7_241_732_096,
    "Llama-3.1-8B": 8_030_261_248,
    "Qwen2.5-14B": 14_770_033_664,
    "gemma-2-27b": 27_227_128_320,
    "Qwen2.5-72B": 72_706_203_648,
    "Llama-3.3-70B-Instruct": 70_553_706_496,
}


def meta_model(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(CONFIGS / name))


@pytest.mark.parametrize("name", list(PARAMETERS))
def test_each_plan_counts_the_meta_tensors_and_the_methods_precompute(name):
    model = meta_model(name)
    entries = sum(p.numel() for p in model.parameters())  # a tied head is the embedding: listed once
    assert entries == PARAMETERS[name]
    shapes = Shapes.of_model(model)
    free = {"cuda:0": 10**15}  # room for the fastest tier
    # Per entry of one copy: TIES keeps each task vector's sort key (the dtype's size on a GPU) and int32
    # order; DARE draws per candidate on a GPU; linear keeps nothing. Linear reads the 3 experts, the task
    # arithmetic family the base and 3 task vectors.
    for method, dtype, itemsize, sources, per_entry in [
        ("linear", "bfloat16", 2, 3, 0),
        ("ties", "bfloat16", 2, 4, 3 * (2 + 4)),
        ("ties", "float32", 4, 4, 3 * (4 + 4)),
        ("dare_ties", "bfloat16", 2, 4, 0),
    ]:
        plan = plan_shapes(
            shapes,
            method=get_method(method),
            sources=sources,
            experts=3,
            dtype=dtype,
            free=free,
            host_free=0,
            reserve=0,
        )
        parts = plan.shares["cuda:0"]
        assert plan.tier == "resident" and plan.precompute == bool(per_entry), (name, method)
        assert (parts["model"], parts["sources"]) == (entries * itemsize, entries * itemsize * sources)
        assert parts.get("precompute", 0) == entries * per_entry


def test_mistral_7b_with_3_ties_experts_in_bfloat16_is_resident_on_an_h200():
    shapes = Shapes.of_model(meta_model("Mistral-7B-v0.1"))
    reserve = reserve_parts(shapes.config, dtype="bfloat16", batch_size=16, length=2048)
    common = dict(method=get_method("ties"), sources=4, experts=3, dtype="bfloat16", host_free=512 * GIB)
    plan = plan_shapes(shapes, **common, free={"cuda:0": H200}, reserve=reserve)
    # 5 copies of 7.24e9 entries in bfloat16 (67.4 GiB), the embedding's 4 inputs as read (32,000 x 4,096 x 2
    # bytes each, 0.98 GiB) and a 12.6 GiB reserve; the sorted magnitudes (18 bytes an entry, 121 GiB) do not fit.
    assert (plan.tier, plan.precompute) == ("resident", False)
    assert plan.shares["cuda:0"]["temporaries"] == 32_000 * 4096 * 2 * 4
    assert plan.headroom_on("cuda:0") - plan.shares["cuda:0"]["reserve"] == pytest.approx(58.0 * GIB, abs=0.05 * GIB)
    # On one H100 the sources go to host memory and stream.
    assert plan_shapes(shapes, **common, free={"cuda:0": H100}, reserve=reserve).tier == "host"


def test_the_flagship_preset_fits_one_h100_with_the_reserve_its_requests_need():
    """conf/preset/mistral_ja_math.yaml: DARE-TIES of 3 Mistral-7B experts in bfloat16. Its comment bounds its
    requests: MGSM-JA's 5-shot prompts and 256 generated tokens under 4,096 tokens, JCommonsenseQA's 3-shot
    choices under 1,024. At its batch size the worker's reserve for them fits beside the sources."""
    preset = yaml.safe_load(PRESET.read_text())
    assert (preset["dtype"], len(preset["models"]["experts"])) == ("bfloat16", 3)
    shapes = Shapes.of_model(meta_model("Mistral-7B-v0.1"))
    common = dict(method=get_method("dare_ties"), sources=4, experts=3, dtype="bfloat16", host_free=512 * GIB)

    def plan(batch: int):
        reserve = requests_reserve(
            shapes.config, dtype="bfloat16", batch_size=batch, max_length=None, scored=1024, generated=4096
        )
        return plan_shapes(shapes, **common, free={"cuda:0": H100}, reserve=reserve)

    fitted = plan(preset["tasks"]["batch_size"])
    assert fitted.tier == "resident" and not fitted.short
    # The batch the preset had: 16.4 GiB of reserve beside 67.4 GiB of sources sends them to host memory.
    assert plan(16).tier == "host"
