"""Parameter-space merges on every family users merge: tiny random models of each, a base and two fine-tunes.

Per family: the merge to disk gives mergekit 0.1.5's tensors, the in-place merge gives the merge to disk's
bits, the output loads and generates, and tied embeddings stay tied (and a tied source merged with an
untied one gives an untied output, as transformers reads a tied source's head: its embedding).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from evomerge.io.checkpoint import Checkpoint
from evomerge.materialize.in_place import InPlaceMerger
from evomerge.materialize.to_disk import merge_to_disk
from evomerge.recipe.mergekit import to_mergekit
from evomerge.recipe.recipe import Recipe
from tests.families import FAMILIES
from tests.families import SIZES as SHARED_SIZES

MERGEKIT_PYTHON = os.environ.get("EVOMERGE_MERGEKIT_PYTHON")
HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"
SIZES = dict(SHARED_SIZES, num_hidden_layers=2)
# One recipe per method: linear of the two fine-tunes; the others on the base, with per-layer gradients.
RECIPES = {
    "linear": dict(base=False, models=[{"weight": [0.3, 0.7]}, {"weight": 0.5}]),
    "task_arithmetic": dict(models=[{"weight": 0.8}, {"weight": [0.4, 1.0]}]),
    "ties": dict(models=[{"weight": 1.0, "density": [0.3, 0.9]}, {"weight": 0.5, "density": 0.5}]),
    "slerp": dict(models=[{}], parameters={"t": [0.2, 0.8]}),
}
IDS = torch.tensor([[1, 5, 6, 7, 8, 9]])


@dataclass(frozen=True)
class World:
    """A family's base and two fine-tunes (base + noise), saved as transformers saves them."""

    family: str
    base: Path
    experts: tuple[Path, Path]

    def recipe(self, method: str, experts: tuple[Path, ...] | None = None) -> Recipe:
        spec = RECIPES[method]
        experts = (experts or self.experts)[: len(spec["models"])]
        return Recipe.from_plain(
            {
                "method": method,
                "base": str(self.base) if spec.get("base", True) else None,
                "models": [
                    {"model": str(path), **params} for path, params in zip(experts, spec["models"], strict=True)
                ],
                "parameters": spec.get("parameters", {}),
                "dtype": "float32",
            }
        )


def config_for(family: str):
    model_type, extra = FAMILIES[family]
    return AutoConfig.for_model(model_type, **SIZES, **extra)


def perturb(model: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return model


def fine_tune(base: torch.nn.Module, seed: int, *, untie: bool = False) -> torch.nn.Module:
    """A copy of ``base`` with noise on every weight (half the init's scale: slerp's angles are far from 0);
    ``untie`` gives the head its own copy of the embedding first."""
    model = AutoModelForCausalLM.from_config(base.config, dtype=torch.float32)
    model.load_state_dict(base.state_dict())
    if untie:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(base.lm_head.weight.detach().clone())
    return perturb(model, seed, 0.01)


def build(family: str, root: Path) -> World:
    torch.manual_seed(0)
    # Noise on the random init too, as training leaves it: Gemma initialises its norms (1 + w) at w = 0,
    # and slerp of a zero vector is a degenerate case, not the one real merges meet.
    base = perturb(AutoModelForCausalLM.from_config(config_for(family), dtype=torch.float32), 0, 0.02)
    base.save_pretrained(root / "base")
    for seed in (1, 2):
        fine_tune(base, seed).save_pretrained(root / f"expert{seed}")
    return World(family=family, base=root / "base", experts=(root / "expert1", root / "expert2"))


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[str, World]:
    root = tmp_path_factory.mktemp("families")
    return {family: build(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="module")
def untied_expert(worlds) -> Path:
    """An untied fine-tune of the tied Llama base: its head starts as the embedding and moves apart."""
    world = worlds["llama_tied"]
    base = AutoModelForCausalLM.from_pretrained(world.base, dtype=torch.float32)
    path = world.base.parent / "untied"
    fine_tune(base, 3, untie=True).save_pretrained(path)
    return path


# Merges of tied and untied Llamas: on the tied base, and (linear) with the untied model first.
MIXED = ("task_arithmetic", "linear")


def mixed_recipe(worlds, untied_expert: Path, method: str) -> Recipe:
    world = worlds["llama_tied"]
    experts = (world.experts[0], untied_expert) if method != "linear" else (untied_expert, world.experts[0])
    return world.recipe(method, experts=experts)


@pytest.fixture(scope="module")
def ours(worlds, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """evomerge's merge to disk of every family and method."""
    root = tmp_path_factory.mktemp("evomerge")
    return {
        (family, method): merge_to_disk(world.recipe(method), root / f"{family}-{method}")
        for family, world in worlds.items()
        for method in RECIPES
    }


@pytest.fixture(scope="module")
def mixed(worlds, untied_expert, tmp_path_factory) -> dict[str, Path]:
    """evomerge's merges to disk of tied and untied Llamas (``MIXED``)."""
    root = tmp_path_factory.mktemp("evomerge-mixed")
    return {method: merge_to_disk(mixed_recipe(worlds, untied_expert, method), root / method) for method in MIXED}


# mergekit runs in its own interpreter (EVOMERGE_MERGEKIT_PYTHON); one process merges every config. 0.1.5
# declares every family here (mergekit/_data/architectures: llama, mistral, qwen2, qwen3, gemma2, gemma3
# for gemma3_text, phi3), so none is skipped; a family it lacked would fail its merge, not pass unchecked.
RUN_ALL = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
for config_path, out in zip(sys.argv[1::2], sys.argv[2::2]):
    config = MergeConfiguration.model_validate(yaml.safe_load(open(config_path)))
    run_merge(config, out, options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, quiet=True))
"""


@pytest.fixture(scope="module")
def theirs(worlds, untied_expert, tmp_path_factory) -> dict[tuple[str, str], Path]:
    if not MERGEKIT_PYTHON:
        pytest.skip("set EVOMERGE_MERGEKIT_PYTHON to a python with mergekit 0.1.5 (make test does)")
    root = tmp_path_factory.mktemp("mergekit")
    recipes = {(family, method): world.recipe(method) for family, world in worlds.items() for method in RECIPES}
    recipes.update({("mixed", method): mixed_recipe(worlds, untied_expert, method) for method in MIXED})
    args, outputs = [], {}
    for (family, method), recipe in recipes.items():
        config = root / f"{family}-{method}.yml"
        config.write_text(yaml.safe_dump(to_mergekit(recipe)))
        outputs[family, method] = root / f"{family}-{method}"
        args += [str(config), str(outputs[family, method])]
    subprocess.run([MERGEKIT_PYTHON, "-c", RUN_ALL, *args], check=True, capture_output=True)
    # mergekit keeps the tied base's tie_word_embeddings beside the head it writes: untie them as the card
    # tells a user to, or the head reads (as transformers loads it) as the embedding.
    for method in MIXED:
        config = outputs["mixed", method] / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "tie_word_embeddings": False}))
    return outputs


CASES = [(family, method) for family in FAMILIES for method in RECIPES]


@pytest.mark.parametrize(("family", "method"), [*CASES, *[("mixed", method) for method in MIXED]])
def test_same_tensors_as_mergekit(request, ours, theirs, worlds, family, method):
    out = request.getfixturevalue("mixed")[method] if family == "mixed" else ours[family, method]
    mine, reference = Checkpoint.open(out), Checkpoint.open(theirs[family, method])
    assert sorted(mine.names) == sorted(reference.names)
    worst = max((mine.load(n) - reference.load(n)).abs().max().item() for n in mine.names)
    assert worst <= 1e-5, f"{family} {method}: max |evomerge - mergekit| = {worst}"
    base = Checkpoint.open(worlds["llama_tied" if family == "mixed" else family].base)
    assert any(not torch.equal(mine.load(n), base.load(n)) for n in base.names)


@pytest.mark.parametrize(("family", "method"), CASES)
def test_in_place_equals_to_disk(ours, worlds, family, method):
    world = worlds[family]
    recipe = world.recipe(method)
    live = AutoModelForCausalLM.from_pretrained(world.base, dtype=torch.float32)
    InPlaceMerger(model=live, template=recipe).materialize(recipe)
    written = Checkpoint.open(ours[family, method])
    state = live.state_dict()
    for name in written.names:
        assert torch.equal(state[name], written.load(name)), name


@torch.no_grad()
@pytest.mark.parametrize(("family", "method"), CASES)
def test_loads_and_generates(ours, family, method):
    model = AutoModelForCausalLM.from_pretrained(ours[family, method], dtype=torch.float32).eval()
    assert type(model) is type(AutoModelForCausalLM.from_config(config_for(family)))
    assert model(IDS).logits.isfinite().all()
    generated = model.generate(IDS, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, IDS.shape[1] + 4)


@pytest.mark.parametrize("family", FAMILIES)
def test_tied_embeddings_stay_tied(ours, worlds, family):
    world = worlds[family]
    tied = config_for(family).tie_word_embeddings
    for path in (world.base, *world.experts):
        assert (HEAD in Checkpoint.open(path).names) != tied
    for method in RECIPES:
        out = ours[family, method]
        assert (HEAD in Checkpoint.open(out).names) != tied
        assert AutoConfig.from_pretrained(out).tie_word_embeddings == tied
    model = AutoModelForCausalLM.from_pretrained(ours[family, "ties"], dtype=torch.float32)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    if not tied:
        return
    recipe = world.recipe("ties")
    live = AutoModelForCausalLM.from_pretrained(world.base, dtype=torch.float32)
    InPlaceMerger(model=live, template=recipe).materialize(recipe)
    assert live.lm_head.weight is live.model.embed_tokens.weight
    assert torch.equal(live.model.embed_tokens.weight, Checkpoint.open(ours[family, "ties"]).load(EMBEDDING))


@pytest.mark.parametrize("method", MIXED)
def test_a_tied_and_an_untied_source_give_an_untied_merge(mixed, worlds, untied_expert, method):
    world = worlds["llama_tied"]
    base, expert, untied = (Checkpoint.open(path) for path in (world.base, world.experts[0], untied_expert))
    assert HEAD not in base.names and HEAD not in expert.names and HEAD in untied.names
    out = mixed[method]
    merged = Checkpoint.open(out)
    assert HEAD in merged.names
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    card = (out / "README.md").read_text()
    tied = [world.base, world.experts[0]] if method == "task_arithmetic" else [world.experts[0]]
    assert (
        f"untied (`tie_word_embeddings: false`, its own `lm_head.weight`): {', '.join(f'`{p}`' for p in tied)} tied"
        in card
    )
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight.detach(), merged.load(HEAD))
    # The head merges the tied sources' embeddings with the untied source's head (weights at t = 0).
    embedding = {c: c.load(EMBEDDING) for c in (base, expert)}
    if method == "task_arithmetic":
        head = (
            embedding[base] + 0.8 * (embedding[expert] - embedding[base]) + 0.4 * (untied.load(HEAD) - embedding[base])
        )
    else:
        head = (0.3 * untied.load(HEAD) + 0.5 * embedding[expert]) / 0.8
    torch.testing.assert_close(merged.load(HEAD), head, rtol=0, atol=1e-6)
    # In place, on a model loaded from the tied base: the head is untied, as on disk.
    recipe = mixed_recipe(worlds, untied_expert, method)
    live = AutoModelForCausalLM.from_pretrained(world.base, dtype=torch.float32)
    InPlaceMerger(model=live, template=recipe).materialize(recipe)
    assert live.lm_head.weight is not live.model.embed_tokens.weight
    assert live.config.tie_word_embeddings is False
    state = live.state_dict()
    for name in merged.names:
        assert torch.equal(state[name], merged.load(name)), name
