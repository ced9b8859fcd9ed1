"""The toy world builder: real sharded checkpoints, deterministic, cached, atomic, and lm-eval tasks that load."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import evomerge.toy.world as world_module
from evomerge.errors import EvomergeError
from evomerge.evaluate.lm_eval_scorer import LMEvalScorer, TaskSet
from evomerge.toy import ToyWorld, build_world
from evomerge.toy.language import L2_WORDS, TWINS, translate
from evomerge.toy.models import tensor_digest

L1_SENTENCE = "anna has three cats , so the count is 3"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> ToyWorld:
    return build_world(size="tiny", seed=0, root=tmp_path_factory.mktemp("toy"))


def all_model_folders(world: ToyWorld) -> list[Path]:
    return [world.base, *world.experts.values(), *world.incompatible.values()]


def test_world_has_the_promised_parts(world: ToyWorld) -> None:
    assert {"lang", "math"} <= set(world.experts)
    assert set(world.incompatible) == {"hidden", "layers"}
    assert set(world.tasks) == {"lang", "math", "combined"}
    assert all(name.startswith("toy_") for name in [*world.tasks.values(), *world.holdout_tasks.values()])


def test_every_model_is_sharded_with_a_complete_index(world: ToyWorld) -> None:
    for folder in all_model_folders(world):
        shards = sorted(folder.glob("*.safetensors"))
        assert len(shards) >= 2, folder
        for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (folder / name).exists(), folder / name
        weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        assert set(weight_map.values()) == {shard.name for shard in shards}
        for tensor_name, shard in weight_map.items():
            with safe_open(folder / shard, framework="pt") as handle:
                assert tensor_name in handle.keys(), (folder, tensor_name)


def test_models_reload_with_untied_heads_and_give_finite_logits(world: ToyWorld) -> None:
    tokenizer = AutoTokenizer.from_pretrained(world.base)
    batch = tokenizer([L1_SENTENCE, translate(L1_SENTENCE)], return_tensors="pt")
    for folder in all_model_folders(world):
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.model_type == "llama"
        assert model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()
        with torch.no_grad():
            logits = model(**batch).logits
        assert logits.shape == (2, batch.input_ids.shape[1], len(tokenizer))
        assert torch.isfinite(logits).all(), folder


def test_tokenizer_round_trips_a_sentence_of_each_language(world: ToyWorld) -> None:
    tokenizer = AutoTokenizer.from_pretrained(world.experts["lang"])
    for sentence in (L1_SENTENCE, translate(L1_SENTENCE)):
        ids = tokenizer(sentence).input_ids
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == sentence
    assert translate(L1_SENTENCE) != L1_SENTENCE


def test_recorded_digests_match_the_files(world: ToyWorld) -> None:
    for name, digest in world.digests.items():
        assert tensor_digest(world.root / "models" / name) == digest


def test_same_seed_gives_identical_tensors_and_another_seed_does_not(world: ToyWorld, tmp_path: Path) -> None:
    again = build_world(size="tiny", seed=0, root=tmp_path / "again")
    assert again.root != world.root
    assert again.digests == world.digests
    other = build_world(size="tiny", seed=1, root=tmp_path / "again")
    assert all(other.digests[name] != world.digests[name] for name in world.digests)


def test_cache_hit_returns_quickly_without_rebuilding(world: ToyWorld) -> None:
    marker = world.root / world_module.COMPLETE_MARKER
    before = marker.stat().st_mtime_ns
    start = time.perf_counter()
    again = build_world(size="tiny", seed=0, root=world.root.parent)
    assert time.perf_counter() - start < 2.0
    assert again == world
    assert marker.stat().st_mtime_ns == before


def _build_tiny_digests(root: str) -> dict[str, str]:
    return build_world(size="tiny", seed=0, root=root).digests


def test_two_processes_building_at_once_share_one_world(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        first, second = pool.map(_build_tiny_digests, [str(tmp_path)] * 2)
    assert first == second
    folders = [path.name for path in tmp_path.iterdir() if not path.name.endswith(".lock")]
    assert folders == [f"tiny-seed0-v{world_module.BUILDER_VERSION}"]


def test_a_failed_build_leaves_no_folder_that_looks_complete(tmp_path: Path, monkeypatch) -> None:
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(world_module, "train_models", killed)
    with pytest.raises(KeyboardInterrupt):
        build_world(size="tiny", seed=0, root=tmp_path)
    assert [path.name for path in tmp_path.iterdir() if not path.name.endswith(".lock")] == []


def test_unknown_size_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(EvomergeError, match="tiny"):
        build_world(size="huge", root=tmp_path)


def test_incompatible_models_differ_in_hidden_size_or_layer_count(world: ToyWorld) -> None:
    base = AutoModelForCausalLM.from_pretrained(world.base).config
    hidden = AutoModelForCausalLM.from_pretrained(world.incompatible["hidden"]).config
    layers = AutoModelForCausalLM.from_pretrained(world.incompatible["layers"]).config
    assert hidden.hidden_size != base.hidden_size and hidden.num_hidden_layers == base.num_hidden_layers
    assert layers.num_hidden_layers != base.num_hidden_layers and layers.hidden_size == base.hidden_size
    assert hidden.vocab_size == layers.vocab_size == base.vocab_size


def test_experts_leave_the_input_rows_they_never_read(world: ToyWorld) -> None:
    """The language expert trains its L1 input rows at no stage (its vocabulary stage moves only L2 rows,
    its continued pre-training reads no L1 word), and the math expert freezes its input embeddings: with
    zero weight decay, untouched rows stay bit-identical, so each task vector is where the design says."""
    tokenizer = AutoTokenizer.from_pretrained(world.base)
    l1_ids = tokenizer.convert_tokens_to_ids([l1 for l1, _ in TWINS])
    l2_ids = tokenizer.convert_tokens_to_ids(list(L2_WORDS))
    base = AutoModelForCausalLM.from_pretrained(world.base).state_dict()
    lang = AutoModelForCausalLM.from_pretrained(world.experts["lang"]).state_dict()
    math = AutoModelForCausalLM.from_pretrained(world.experts["math"]).state_dict()
    embed = "model.embed_tokens.weight"
    assert torch.equal(lang[embed][l1_ids], base[embed][l1_ids])
    assert (lang[embed][l2_ids] != base[embed][l2_ids]).any()
    assert torch.equal(math[embed], base[embed])
    layer = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(lang[layer], base[layer]) and not torch.equal(math[layer], base[layer])


def test_task_folders_score_offline_in_lm_eval(world: ToyWorld) -> None:
    names = (*world.tasks.values(), *world.holdout_tasks.values())
    tokenizer = AutoTokenizer.from_pretrained(world.base)
    model = AutoModelForCausalLM.from_pretrained(world.experts["math"])
    tasks = TaskSet(names=names, include_path=str(world.tasks_dir))
    scores = LMEvalScorer(model=model, tokenizer=tokenizer, tasks=tasks).score()
    assert {f"{name}/acc" for name in names} <= set(scores)
    assert all(0.0 <= scores[f"{name}/acc"] <= 1.0 for name in names)


def test_lm_eval_simple_evaluate_runs_offline_on_a_loaded_model(world: ToyWorld) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tokenizer = AutoTokenizer.from_pretrained(world.base)
    model = AutoModelForCausalLM.from_pretrained(world.experts["lang"])
    results = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=64, device="cpu"),
        tasks=[world.tasks["lang"]],
        task_manager=TaskManager(include_path=str(world.tasks_dir), include_defaults=False),
        bootstrap_iters=0,
        log_samples=False,
    )
    items = len((world.tasks_dir / world.tasks["lang"] / "test.jsonl").read_text().splitlines())
    accuracy = results["results"][world.tasks["lang"]]["acc,none"]
    assert 0.0 <= accuracy <= 1.0 and (accuracy * items) == pytest.approx(round(accuracy * items))
