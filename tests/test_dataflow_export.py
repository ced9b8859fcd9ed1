"""A data-flow model written to disk loads with AutoModelForCausalLM and gives the search-time logits."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from evomerge.cli import main
from evomerge.io.checkpoint import Checkpoint
from evomerge.materialize.dataflow import DataFlowRouter
from evomerge.materialize.dataflow_to_disk import MERGEKIT_NAME, MODELING_NAME, write_dataflow_model
from evomerge.recipe.dataflow import DataFlowRecipe, PathStep
from tests.test_mergekit_parity import RUN_ALL

IDS = torch.tensor([[2, 5, 6, 7, 8, 9, 10, 11], [2, 12, 13, 14, 15, 16, 17, 18]])
MERGEKIT_PYTHON = os.environ.get("EVOMERGE_MERGEKIT_PYTHON")


@pytest.fixture(scope="module")
def sources(toy_world):
    return (str(toy_world.base), str(toy_world.experts["math"]), str(toy_world.incompatible["layers"]))


@pytest.fixture(scope="module")
def router(sources):
    template = DataFlowRecipe(sources=sources, path=(), embedding_source=1)
    return DataFlowRouter.load(template, device=torch.device("cpu"), dtype=torch.float32)


def recipe(sources, *steps):
    path = tuple(PathStep(source=s, layer=layer, scale=scale) for s, layer, scale in steps)
    return DataFlowRecipe(sources=sources, path=path, embedding_source=1, dtype="float32")


@torch.no_grad()
def search_time_logits(router, candidate):
    router.materialize(candidate)
    return router.model(IDS).logits


@torch.no_grad()
def test_unit_scales_export_a_standard_llama_with_the_same_logits(sources, router, tmp_path):
    candidate = recipe(sources, (0, 0, 1.0), (2, 2, 1.0), (0, 0, 1.0), (1, 1, 1.0))
    out = write_dataflow_model(candidate, tmp_path / "plain", scores={"combined": 0.5})
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 4
    assert torch.equal(model(IDS).logits, search_time_logits(router, candidate))
    # Layer 2 is base's layer 0 again, written as its own tensors.
    written, base = Checkpoint.open(out), Checkpoint.open(sources[0])
    name = "self_attn.q_proj.weight"
    assert torch.equal(written.load(f"model.layers.2.{name}"), base.load(f"model.layers.0.{name}"))
    assert (out / MERGEKIT_NAME).exists() and not (out / MODELING_NAME).exists()
    assert "| combined | 0.5000 |" in (out / "README.md").read_text()


@torch.no_grad()
def test_scaled_paths_ship_their_modeling_code_and_match_exactly(sources, router, tmp_path):
    candidate = recipe(sources, (0, 0, 1.0), (2, 2, 1.37), (0, 0, 0.61), (1, 1, 1.0))
    out = write_dataflow_model(candidate, tmp_path / "scaled")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True)
    assert type(model).__name__ == "DataFlowLlamaForCausalLM"
    assert torch.equal(model(IDS).logits, search_time_logits(router, candidate))
    assert "trust_remote_code=True" in (out / "README.md").read_text() and not (out / MERGEKIT_NAME).exists()
    # Without trust_remote_code loading fails: a plain Llama would silently drop the scales.
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)


@torch.no_grad()
def test_evomerge_merge_writes_a_dataflow_recipe_file(sources, router, tmp_path):
    candidate = recipe(sources, (2, 0, 1.0), (1, 1, 1.0), (0, 1, 1.0))
    (tmp_path / "path.yaml").write_text(candidate.to_yaml())
    assert main(["merge", str(tmp_path / "path.yaml"), str(tmp_path / "out")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert torch.equal(model(IDS).logits, search_time_logits(router, candidate))


@pytest.mark.skipif(
    not MERGEKIT_PYTHON, reason="set EVOMERGE_MERGEKIT_PYTHON to a python with mergekit 0.1.5 (make test does)"
)
def test_the_passthrough_config_gives_mergekit_the_same_tensors(sources, tmp_path):
    candidate = recipe(sources, (0, 0, 1.0), (0, 1, 1.0), (2, 2, 1.0), (0, 0, 1.0))
    ours = Checkpoint.open(write_dataflow_model(candidate, tmp_path / "ours"))
    config = tmp_path / "passthrough.yml"
    config.write_text((tmp_path / "ours" / MERGEKIT_NAME).read_text())
    subprocess.run([MERGEKIT_PYTHON, "-c", RUN_ALL, str(config), str(tmp_path / "theirs")], check=True)
    theirs = Checkpoint.open(tmp_path / "theirs")
    assert sorted(ours.names) == sorted(theirs.names)
    assert all(torch.equal(ours.load(n), theirs.load(n)) for n in ours.names)
    assert yaml.safe_load(config.read_text())["merge_method"] == "passthrough"
