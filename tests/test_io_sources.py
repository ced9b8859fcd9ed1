"""Where checkpoints come from: Hub IDs through huggingface_hub's cache, .bin folders, mixed source dtypes."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file, save_file
from torch.torch_version import TorchVersion

from evomerge.errors import EvomergeError
from evomerge.io.checkpoint import Checkpoint
from evomerge.io.locate import resolve_model
from evomerge.materialize.to_disk import merge_to_disk
from evomerge.recipe.recipe import Recipe

COMMITS = ("a" * 40, "b" * 40)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline. huggingface_hub reads both variables once, at import: its
    constants are set too, as they would be in a process started with these variables."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_model(cache, repo_id, folder, commit, *, refs=("main",), skip=()):
    """Lay ``folder`` out as huggingface_hub does: files stored once under blobs/ by hash, each snapshot a
    folder of links to them, each branch a file naming its commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(folder.iterdir()):
        if file.name in skip:
            continue
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(f"../../blobs/{blob.name}")
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def state_of(folder):
    return {name: tensor for shard in sorted(folder.glob("*.safetensors")) for name, tensor in load_file(shard).items()}


def copy_without_weights(source, target):
    target.mkdir(parents=True)
    for file in source.iterdir():
        if not file.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copyfile(file, target / file.name)
    return target


def bin_folder(source, target, *, shards):
    """``source``'s weights as pytorch_model.bin, or as ``shards`` .bin files with their index, the way
    transformers saved them before safetensors."""
    state = state_of(source)
    copy_without_weights(source, target)
    if shards == 1:
        torch.save(state, target / "pytorch_model.bin")
        return target
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = names[i::shards]
        torch.save({name: state[name] for name in part}, target / file)
        weight_map |= dict.fromkeys(part, file)
    (target / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return target


def assert_same_checkpoint(ours, twin):
    assert sorted(ours.names) == sorted(twin.names) and ours.num_layers == twin.num_layers
    for name in twin.names:
        assert ours.shape(name) == twin.shape(name) and ours.dtype(name) == twin.dtype(name)
        expected = twin.load(name)
        assert torch.equal(ours.load(name), expected)
        assert torch.equal(ours.load(name, dtype=torch.bfloat16), expected.to(torch.bfloat16))
        assert torch.equal(ours.read_into(name, torch.empty_like(expected)), expected)
        assert torch.equal(ours.read_into(name, torch.empty(expected.shape, dtype=torch.float64)), expected.double())


# -- Hub IDs -------------------------------------------------------------------------------------------
def test_hub_id_resolves_offline_to_the_cached_commit(toy_world, hub_cache):
    old = cache_model(hub_cache, "toy/math", toy_world.experts["lang"], COMMITS[0], refs=())
    new = cache_model(hub_cache, "toy/math", toy_world.experts["math"], COMMITS[1])
    latest = resolve_model("toy/math")
    assert (latest.path, latest.repo_id, latest.commit) == (new, "toy/math", COMMITS[1])
    assert latest.pinned == f"toy/math@{COMMITS[1]}"
    assert resolve_model(latest.pinned).path == new
    assert resolve_model(f"toy/math@{COMMITS[0]}").path == old

    checkpoint = Checkpoint.open("toy/math")
    assert checkpoint.revision == COMMITS[1] and checkpoint.ref == f"toy/math@{COMMITS[1]}"
    assert_same_checkpoint(checkpoint, Checkpoint.open(toy_world.experts["math"]))
    pinned = Checkpoint.open(f"toy/math@{COMMITS[0]}")
    assert pinned.revision == COMMITS[0]
    assert_same_checkpoint(pinned, Checkpoint.open(toy_world.experts["lang"]))


def test_an_existing_local_folder_wins_over_the_hub(toy_world, hub_cache, tmp_path, monkeypatch):
    cache_model(hub_cache, "toy/math", toy_world.experts["math"], COMMITS[0])
    monkeypatch.chdir(tmp_path)
    shutil.copytree(toy_world.experts["lang"], tmp_path / "toy" / "math")
    local = resolve_model("toy/math")
    assert local.path.resolve() == (tmp_path / "toy" / "math") and local.commit is None
    assert local.pinned == "toy/math"
    assert_same_checkpoint(Checkpoint.open("toy/math"), Checkpoint.open(toy_world.experts["lang"]))


def test_a_model_missing_from_the_cache_offline_names_the_id_and_the_fix(hub_cache):
    for ref, command in [("toy/absent", "toy/absent"), ("toy/absent@v1", "toy/absent --revision v1")]:
        with pytest.raises(EvomergeError) as caught:
            Checkpoint.open(ref)
        message = str(caught.value)
        assert f"'{ref}' is not a folder here, nor in the Hugging Face cache ({hub_cache})" in message
        assert "offline mode (HF_HUB_OFFLINE) forbids downloading it" in message
        assert f"`hf download {command}`" in message and f"`huggingface-cli download {command}`" in message
        assert "or unset HF_HUB_OFFLINE" in message and "\n" not in message


def test_a_cached_snapshot_without_its_weights_is_named(toy_world, hub_cache):
    shard = sorted(toy_world.experts["math"].glob("*.safetensors"))[-1].name
    cache_model(hub_cache, "toy/math", toy_world.experts["math"], COMMITS[0], skip={shard})
    with pytest.raises(EvomergeError, match=f"at commit {COMMITS[0]} without {shard}, and offline mode"):
        Checkpoint.open("toy/math")


def test_a_bin_only_hub_model_resolves_to_its_bin_weights(toy_world, hub_cache, tmp_path):
    folder = bin_folder(toy_world.experts["math"], tmp_path / "bin", shards=1)
    cache_model(hub_cache, "toy/math-bin", folder, COMMITS[0])
    checkpoint = Checkpoint.open("toy/math-bin")
    assert {file.name for file in checkpoint.shards.values()} == {"pytorch_model.bin"}
    assert_same_checkpoint(checkpoint, Checkpoint.open(toy_world.experts["math"]))


# -- .bin folders --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shards", [1, 3])
def test_bin_folder_reads_as_its_safetensors_twin(toy_world, tmp_path, shards):
    twin = Checkpoint.open(toy_world.experts["math"])
    assert_same_checkpoint(
        Checkpoint.open(bin_folder(toy_world.experts["math"], tmp_path / "bin", shards=shards)), twin
    )


def test_merging_bin_folders_gives_the_safetensors_merge(toy_world, tmp_path):
    def recipe(base, math):
        return Recipe.from_plain(
            {"method": "ties", "base": str(base), "models": [{"model": str(math), "weight": 0.7, "density": 0.5}]}
        )

    base = bin_folder(toy_world.base, tmp_path / "base-bin", shards=2)
    math = bin_folder(toy_world.experts["math"], tmp_path / "math-bin", shards=1)
    ours = merge_to_disk(recipe(base, math), tmp_path / "from-bin")
    theirs = merge_to_disk(recipe(toy_world.base, toy_world.experts["math"]), tmp_path / "from-safetensors")
    assert state_of(ours).keys() == state_of(theirs).keys()
    assert all(torch.equal(state_of(ours)[name], tensor) for name, tensor in state_of(theirs).items())


def test_a_pickle_that_would_run_code_is_refused_without_running_it(toy_world, tmp_path):
    witness = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (witness.write_text, ("pwned",))

    folder = copy_without_weights(toy_world.experts["math"], tmp_path / "evil")
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "extra": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(EvomergeError, match="cannot be read as plain tensors.*could run code"):
        Checkpoint.open(folder)
    assert not witness.exists()


def test_bin_weights_are_refused_on_a_torch_without_the_weights_only_fixes(toy_world, tmp_path, monkeypatch):
    folder = bin_folder(toy_world.experts["math"], tmp_path / "bin", shards=1)
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.5.1"))
    with pytest.raises(EvomergeError, match=r"torch 2\.5\.1 cannot load them safely.*install torch >= 2\.6"):
        Checkpoint.open(folder)


# -- mixed source dtypes ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("dtype", "expected"), [("float32", torch.float32), (None, torch.bfloat16)])
def test_mixed_source_dtypes_merge_in_the_recipe_dtype_else_the_base_dtype(toy_world, tmp_path, dtype, expected):
    """A bf16 base and an fp32 expert: every input is cast to the output dtype when read, and the output
    dtype is the recipe's, or without one the base's (its first tensor's, as stored)."""
    base = copy_without_weights(toy_world.base, tmp_path / "base-bf16")
    save_file({k: v.to(torch.bfloat16) for k, v in state_of(toy_world.base).items()}, str(base / "model.safetensors"))
    plain = {"method": "task_arithmetic", "base": str(base), "models": [{"model": str(toy_world.experts["math"])}]}
    plain["models"][0]["weight"] = 0.5
    out = merge_to_disk(Recipe.from_plain(plain | ({"dtype": dtype} if dtype else {})), tmp_path / "out")
    merged = state_of(out)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(expected).removeprefix("torch.")
    expert = state_of(toy_world.experts["math"])
    for name, tensor in state_of(base).items():
        assert merged[name].dtype == expected
        b, e = tensor.to(expected), expert[name].to(expected)
        torch.testing.assert_close(merged[name], b + 0.5 * (e - b))


def test_a_search_on_hub_ids_records_their_commits_and_exports_from_them(toy_world, hub_cache, tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from evomerge.config import CONF_DIR, register_configs
    from evomerge.export import export_run
    from evomerge.search.session import start

    for name, folder in (("base", toy_world.base), ("math", toy_world.experts["math"])):
        cache_model(hub_cache, f"toy/{name}", folder, COMMITS[0])
    register_configs()
    run_dir = tmp_path / "run"
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"run_dir={run_dir}",
                "models.base=toy/base",
                "models.experts=[toy/math]",
                f"tasks.include_path={toy_world.tasks_dir}",
                "tasks.names=[toy_math]",
                "tasks.limit=4",
                "objectives=[{name: math, terms: {toy_math/acc: 1.0}}]",
                "method=task_arithmetic",
                "optimizer.popsize=4",
                "budget.evaluations=4",
            ],
        )
    start(cfg, run_dir)
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.models.base == f"toy/base@{COMMITS[0]}" and list(saved.models.experts) == [f"toy/math@{COMMITS[0]}"]
    [out] = export_run(run_dir, tmp_path / "best")
    recipe = (out / "evomerge_recipe.yaml").read_text()
    assert f"toy/base@{COMMITS[0]}" in recipe and f"toy/math@{COMMITS[0]}" in recipe
    assert Checkpoint.open(out).names == Checkpoint.open(toy_world.base).names


def test_merge_writes_its_recipe_with_hub_ids_pinned_to_their_commits(toy_world, hub_cache, tmp_path):
    from evomerge.cli import main
    from evomerge.recipe.plain import load_any_recipe

    for name, folder in (("base", toy_world.base), ("math", toy_world.experts["math"])):
        cache_model(hub_cache, f"toy/{name}", folder, COMMITS[0])
    written = Recipe.from_plain(
        {
            "method": "task_arithmetic",
            "base": "toy/base",
            "models": [{"model": "toy/math", "weight": 0.5}, {"model": str(toy_world.experts["lang"]), "weight": 0.5}],
            "parameters": {"lambda": 1.0},
            "dtype": "float32",
        }
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(written.to_yaml())
    assert main(["merge", str(path), str(tmp_path / "out")]) == 0
    pinned = load_any_recipe(tmp_path / "out" / "evomerge_recipe.yaml")
    assert pinned.base == f"toy/base@{COMMITS[0]}"
    assert [entry.model for entry in pinned.models] == [f"toy/math@{COMMITS[0]}", str(toy_world.experts["lang"])]
    # merging the written recipe again, once the branch has moved on, reads the same weights
    cache_model(hub_cache, "toy/math", toy_world.experts["lang"], COMMITS[1])
    assert main(["merge", str(tmp_path / "out" / "evomerge_recipe.yaml"), str(tmp_path / "again")]) == 0
    first, again = state_of(tmp_path / "out"), state_of(tmp_path / "again")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_data_flow_and_slices_recipes_pin_every_model_they_name(toy_world, hub_cache):
    from evomerge.recipe.dataflow import DataFlowRecipe, PathStep
    from evomerge.recipe.pinning import pin_recipe
    from evomerge.recipe.slices import SlicesRecipe

    cache_model(hub_cache, "toy/math", toy_world.experts["math"], COMMITS[0])
    local = str(toy_world.base)
    flow = DataFlowRecipe(sources=(local, "toy/math"), path=(PathStep(source=1, layer=0),), embedding_source=1)
    assert pin_recipe(flow).sources == (local, f"toy/math@{COMMITS[0]}")
    stack = SlicesRecipe.from_mergekit(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": local, "layer_range": [0, 1]}]},
                {"sources": [{"model": "toy/math", "layer_range": [1, 2]}]},
            ],
            "tokenizer_source": "toy/math",
        }
    )
    pinned = pin_recipe(stack)
    assert [s.model for piece in pinned.slices for s in piece.sources] == [local, f"toy/math@{COMMITS[0]}"]
    assert pinned.tokenizer_source == f"toy/math@{COMMITS[0]}"
