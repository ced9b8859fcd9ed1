"""Gemma 3 text (tied embeddings) as users meet it: an expert saved as ``pytorch_model.bin`` from the tied
model's state dict, which stores ``lm_head.weight`` as an alias of the embedding (issue 32).

The config ties the head, so the expert is tied whatever the file stores: merged with tied safetensors
sources, the output stays tied (no head tensor, ``tie_word_embeddings: true``), its card says nothing of
untied sources, and its tensors are mergekit 0.1.5's (which adds a copy of the embedding as the head).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from evomerge.io.checkpoint import Checkpoint
from evomerge.materialize.in_place import InPlaceMerger
from evomerge.materialize.to_disk import merge_to_disk
from evomerge.recipe.mergekit import to_mergekit
from evomerge.recipe.recipe import Recipe
from tests.test_architectures import EMBEDDING, HEAD, MERGEKIT_PYTHON, RUN_ALL, config_for, fine_tune, perturb


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tied Gemma 3 text base and a fine-tune in safetensors, and a fine-tune in pytorch_model.bin."""
    root = tmp_path_factory.mktemp("gemma3")
    torch.manual_seed(0)
    base = perturb(AutoModelForCausalLM.from_config(config_for("gemma3_text"), dtype=torch.float32), 0, 0.02)
    base.save_pretrained(root / "base")
    fine_tune(base, 1).save_pretrained(root / "expert")
    pickled = fine_tune(base, 2)
    pickled.save_pretrained(root / "bin")
    # transformers 5 writes safetensors only; a tied model's state dict, torch.save'd, is the .bin of
    # earlier releases: both names, one storage.
    (root / "bin" / "model.safetensors").unlink()
    state = pickled.state_dict()
    assert state[HEAD].data_ptr() == state[EMBEDDING].data_ptr()
    torch.save(state, root / "bin" / "pytorch_model.bin")
    return root / "base", root / "expert", root / "bin"


def recipe(world, method: str) -> Recipe:
    base, expert, pickled = world
    models = [{"model": str(expert), "weight": 0.7}, {"model": str(pickled), "weight": 0.4}]
    if method == "slerp":
        models = [{"model": str(pickled)}]
    return Recipe.from_plain(
        {"method": method, "base": str(base), "models": models, "parameters": {"t": 0.3} if method == "slerp" else {}}
        | {"dtype": "float32"}
    )


METHODS = ("task_arithmetic", "slerp")


@pytest.fixture(scope="module")
def ours(world, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gemma3-merged")
    return {method: merge_to_disk(recipe(world, method), root / method) for method in METHODS}


def test_a_bin_expert_whose_config_ties_reads_as_tied(world) -> None:
    pickled = Checkpoint.open(world[2])
    assert {file.name for file in pickled.shards.values()} == {"pytorch_model.bin"}
    assert HEAD not in pickled.names and EMBEDDING in pickled.names


@pytest.mark.parametrize("method", METHODS)
def test_merged_with_tied_sources_the_output_stays_tied(world, ours, method) -> None:
    out = ours[method]
    assert HEAD not in Checkpoint.open(out).names
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "untied" not in (out / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # In place, on the tied base loaded by transformers: tied too, and the same tensors.
    live = AutoModelForCausalLM.from_pretrained(world[0], dtype=torch.float32)
    InPlaceMerger(model=live, template=recipe(world, method)).materialize(recipe(world, method))
    assert live.lm_head.weight is live.model.embed_tokens.weight and live.config.tie_word_embeddings
    state, written = live.state_dict(), Checkpoint.open(out)
    for name in written.names:
        assert torch.equal(state[name], written.load(name)), name


def stored(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a folder's safetensors files, as stored (a Checkpoint reads a tied model's head as
    its embedding)."""
    tensors = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


@pytest.mark.skipif(not MERGEKIT_PYTHON, reason="set EVOMERGE_MERGEKIT_PYTHON to a python with mergekit 0.1.5")
def test_same_tensors_as_mergekit(world, ours, tmp_path) -> None:
    args = []
    for method in METHODS:
        config = tmp_path / f"{method}.yml"
        config.write_text(yaml.safe_dump(to_mergekit(recipe(world, method))))
        args += [str(config), str(tmp_path / method)]
    subprocess.run([MERGEKIT_PYTHON, "-c", RUN_ALL, *args], check=True, capture_output=True)
    for method in METHODS:
        mine, theirs = stored(ours[method]), stored(tmp_path / method)
        assert json.loads((tmp_path / method / "config.json").read_text())["tie_word_embeddings"] is True
        # mergekit also writes the head it read from the .bin source, merged with the tied ones' (their
        # embeddings): a copy of the merged embedding, which transformers drops for the tie on loading.
        assert set(theirs) == {*mine, HEAD} and HEAD not in mine
        assert torch.equal(theirs.pop(HEAD), theirs[EMBEDDING])
        # slerp is mergekit's operations in mergekit's order; task arithmetic sums in another order (an ulp).
        tolerance = 0 if method == "slerp" else 1e-7
        for name in mine:
            torch.testing.assert_close(mine[name], theirs[name], rtol=0, atol=tolerance, msg=(method, name))
