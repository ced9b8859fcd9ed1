"""mergekit's ``slices:`` form: stacks and per-slice merges of the toy models, against mergekit 0.1.5 itself.

The toy world's base and experts have 2 layers, ``incompatible["layers"]`` 3 of the same width.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from evomerge.cli import main
from evomerge.io.checkpoint import Checkpoint
from evomerge.materialize.dataflow_to_disk import MERGEKIT_NAME, write_dataflow_model
from evomerge.materialize.slices_to_disk import write_slices_model
from evomerge.recipe.dataflow import DataFlowRecipe, PathStep
from evomerge.recipe.plain import load_any_recipe
from evomerge.recipe.slices import SlicesRecipe
from tests.test_mergekit_parity import RUN_ALL

MERGEKIT_PYTHON = os.environ.get("EVOMERGE_MERGEKIT_PYTHON")


def src(model, start, stop, **parameters):
    return {"model": model, "layer_range": [start, stop], **({"parameters": parameters} if parameters else {})}


def configs(world) -> dict[str, tuple[dict, int]]:
    """Each case's mergekit config and the output's layer count."""
    base, math, lang = str(world.base), str(world.experts["math"]), str(world.experts["lang"])
    deep = str(world.incompatible["layers"])
    return {
        "frankenmerge": (
            {
                "merge_method": "passthrough",
                "slices": [
                    {"sources": [src(base, 0, 2)]},
                    {"sources": [src(deep, 1, 3)]},
                    {"sources": [src(math, 1, 2)]},
                ],
            },
            5,
        ),
        "passthrough_scaled": (
            {
                "merge_method": "passthrough",
                "slices": [
                    {"sources": [src(base, 0, 2)], "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}]}},
                    {"sources": [src(lang, 0, 1, scale=1.25)]},
                ],
            },
            3,
        ),
        "linear": (
            {
                "merge_method": "linear",
                "slices": [
                    {"sources": [src(base, 0, 2, weight=[0.2, 0.8]), src(deep, 1, 3, weight=0.5)]},
                    {
                        "sources": [src(math, 1, 2, weight=1.0), src(lang, 0, 1, weight=0.3)],
                        "parameters": {"normalize": False},
                    },
                ],
            },
            3,
        ),
        "task_arithmetic": (
            {
                "merge_method": "task_arithmetic",
                "base_model": base,
                "parameters": {"weight": 0.4},
                "slices": [
                    {"sources": [src(base, 0, 2), src(math, 0, 2, weight=0.7), src(lang, 0, 2, weight=[0.3, 0.9])]},
                    {
                        "sources": [src(math, 1, 2), src(lang, 0, 1, weight=0.5), src(deep, 2, 3)],
                        "base_model": math,
                    },
                ],
            },
            3,
        ),
        "slerp": (
            {
                "merge_method": "slerp",
                "base_model": base,
                "slices": [
                    {"sources": [src(base, 0, 2), src(math, 0, 2)], "parameters": {"t": [0.1, 0.9]}},
                    {"sources": [src(lang, 1, 2), src(deep, 0, 1)], "base_model": lang, "parameters": {"t": 0.3}},
                ],
            },
            3,
        ),
    }


def write(tmp_path, name, config):
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump({**config, "dtype": "float32"}, sort_keys=False))
    return path


def test_recipes_round_trip_through_mergekit_yaml(toy_world):
    for config, _ in configs(toy_world).values():
        recipe = SlicesRecipe.from_mergekit(config)
        assert SlicesRecipe.from_mergekit(recipe.to_mergekit()) == recipe
        assert recipe.to_mergekit()["slices"] == config["slices"]


@pytest.mark.skipif(
    not MERGEKIT_PYTHON, reason="set EVOMERGE_MERGEKIT_PYTHON to a python with mergekit 0.1.5 (make test does)"
)
def test_same_tensors_and_depth_as_mergekit(toy_world, tmp_path):
    cases = configs(toy_world)
    args = []
    for name, (config, _) in cases.items():
        args += [str(write(tmp_path, name, config)), str(tmp_path / f"mergekit-{name}")]
    subprocess.run([MERGEKIT_PYTHON, "-c", RUN_ALL, *args], check=True, capture_output=True)
    for name, (_, layers) in cases.items():
        assert main(["merge", str(tmp_path / f"{name}.yml"), str(tmp_path / f"evomerge-{name}")]) == 0
        ours, theirs = Checkpoint.open(tmp_path / f"evomerge-{name}"), Checkpoint.open(tmp_path / f"mergekit-{name}")
        assert sorted(ours.names) == sorted(theirs.names)
        worst = max((ours.load(n) - theirs.load(n)).abs().max().item() for n in ours.names)
        assert worst <= 1e-5, f"{name}: max |evomerge - mergekit| = {worst}"
        assert ours.num_layers == theirs.num_layers == layers


def test_a_stack_loads_and_generates(toy_world, tmp_path):
    config, layers = configs(toy_world)["frankenmerge"]
    assert main(["merge", str(write(tmp_path, "stack", config)), str(tmp_path / "out"), "--shard-size-mb", "0.05"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert model.config.num_hidden_layers == layers and len(model.model.layers) == layers
    out = model.generate(torch.tensor([[2, 5, 6]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    # Output layer 3 is the 3-layer model's layer 2; the head is math's (the last slice's).
    written, deep = Checkpoint.open(tmp_path / "out"), Checkpoint.open(toy_world.incompatible["layers"])
    name = "self_attn.q_proj.weight"
    assert torch.equal(written.load(f"model.layers.3.{name}"), deep.load(f"model.layers.2.{name}"))
    assert torch.equal(
        written.load("lm_head.weight"), Checkpoint.open(toy_world.experts["math"]).load("lm_head.weight")
    )
    assert isinstance(load_any_recipe(tmp_path / "out" / MERGEKIT_NAME), SlicesRecipe)


def test_a_unit_scale_data_flow_path_and_its_passthrough_slices_give_one_model(toy_world, tmp_path):
    sources = (str(toy_world.base), str(toy_world.experts["math"]), str(toy_world.incompatible["layers"]))
    path = tuple(PathStep(source=s, layer=layer) for s, layer in [(0, 0), (2, 2), (2, 0), (0, 1), (1, 1)])
    dataflow = write_dataflow_model(DataFlowRecipe(sources=sources, path=path, embedding_source=2), tmp_path / "df")
    recipe = load_any_recipe(dataflow / MERGEKIT_NAME)
    assert isinstance(recipe, SlicesRecipe) and recipe.num_layers == len(path)
    stacked = write_slices_model(recipe, tmp_path / "slices")
    ours, theirs = Checkpoint.open(stacked), Checkpoint.open(dataflow)
    assert sorted(ours.names) == sorted(theirs.names)
    assert all(torch.equal(ours.load(n), theirs.load(n)) for n in ours.names)
    assert json.loads((stacked / "config.json").read_text()) == json.loads((dataflow / "config.json").read_text())


def bad_configs(world) -> dict[str, tuple[dict, str]]:
    base, math, wide = str(world.base), str(world.experts["math"]), str(world.incompatible["hidden"])
    return {
        "out_of_range": ({"sources": [src(base, 0, 3)]}, "out of range"),
        "unknown_model": ({"sources": [src(str(world.root / "no-such-model"), 0, 1)]}, "does not exist"),
        "mixed_architectures": ({"sources": [src(wide, 0, 1)]}, "hidden_size"),
        "two_sources_passthrough": ({"sources": [src(base, 0, 1), src(math, 0, 1)]}, "one source per slice"),
        "unequal_lengths": ({"sources": [src(base, 0, 2), src(math, 0, 1)]}, "same length"),
    }


def test_bad_slices_give_one_paragraph_and_no_output(toy_world, tmp_path, capsys):
    for name, (bad, expected) in bad_configs(toy_world).items():
        config = {"merge_method": "passthrough", "slices": [{"sources": [src(str(toy_world.base), 0, 1)]}, bad]}
        assert main(["merge", str(write(tmp_path, name, config)), str(tmp_path / name)]) == 2, name
        message = capsys.readouterr().err
        assert expected in message and message.count("\n") == 1 and "Traceback" not in message, (name, message)
        assert not (tmp_path / name).exists() and not list(tmp_path.glob(f".{name}*"))


def test_a_stack_of_tied_models_stays_tied(toy_world, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(toy_world.base, dtype=torch.float32)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in Checkpoint.open(tmp_path / "tied").names
    config = {
        "merge_method": "passthrough",
        "slices": [{"sources": [src(str(tmp_path / "tied"), i, 2)]} for i in (0, 1)],
    }
    assert main(["merge", str(write(tmp_path, "tied", config)), str(tmp_path / "out")]) == 0
    written = Checkpoint.open(tmp_path / "out")
    assert "lm_head.weight" not in written.names and written.config["tie_word_embeddings"] is True
    stack = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert stack.config.num_hidden_layers == 3
    assert torch.equal(stack.lm_head.weight, stack.model.embed_tokens.weight)
