"""Twin-Merging on the tiny toy world: the routed weights, the router, the exported folder, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from evomerge.cli import main
from evomerge.errors import EvomergeError
from evomerge.evaluate.lm_eval_scorer import LMEvalScorer, TaskSet
from evomerge.recipe.recipe import ModelEntry, Recipe
from evomerge.twin.build import build_twin, twin_from_shared
from evomerge.twin.export import write_twin
from evomerge.twin.items import task_items
from evomerge.twin.router import train_router
from tests.families import FAMILIES, SIZES
from tests.test_search_e2e import overrides

TASKS = ["toy_math", "toy_lang"]


@pytest.fixture(scope="module")
def items(toy_world):
    # A few of each task: enough to train a router, quick enough for a unit test.
    every = task_items(TASKS, include_path=str(toy_world.tasks_dir))
    assert {item.task for item in every} == set(TASKS) and all(item.context for item in every)
    # Exactly the text lm-eval scores: the prompt, then the target with its own leading space and no delimiter
    # added (a second space is another token to a BPE tokenizer such as SmolLM2's).
    first = json.loads((toy_world.tasks_dir / TASKS[0] / "test.jsonl").read_text().splitlines()[0])
    assert (every[0].context, every[0].continuation) == (first["prompt"], first["target"])
    return [item for task in TASKS for item in [i for i in every if i.task == task][:12]]


@pytest.fixture(scope="module")
def batch(toy_world):
    tokenizer = AutoTokenizer.from_pretrained(toy_world.base)
    texts = ["two minus two is six", "three plus three is"]  # the second is padded by one
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, encoded))
    ids = torch.tensor([e + [0] * (width - len(e)) for e in encoded])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded])
    return ids, mask


def experts(world):
    return [str(world.experts["math"]), str(world.experts["lang"])]


def logits_of(path, ids, mask):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path).eval()(input_ids=ids, attention_mask=mask).logits


def test_at_full_rank_a_one_hot_router_gives_the_chosen_experts_logits(toy_world, items, batch):
    # The base model as the shared one: the experts' differences from it are far from low rank.
    twin, summary = twin_from_shared(toy_world.base, experts(toy_world), items, energy=1.0)
    assert summary.kept_bytes > 0.5 * summary.experts_bytes
    ids, mask = batch
    with torch.no_grad():
        for expert, path in enumerate(experts(toy_world)):
            one_hot = torch.nn.functional.one_hot(torch.tensor([expert, expert]), 2).float()
            routed = twin.forward_routed(ids, mask, one_hot).logits
            real = mask.bool()
            torch.testing.assert_close(routed[real], logits_of(path, ids, mask)[real], atol=2e-4, rtol=0)


def test_at_rank_0_the_twin_model_is_the_shared_model(toy_world, items, batch):
    twin, summary = twin_from_shared(toy_world.base, experts(toy_world), items, svd_rank=0)
    assert summary.kept_bytes == 0
    ids, mask = batch
    with torch.no_grad():
        routed = twin(input_ids=ids, attention_mask=mask).logits
    for row in range(len(ids)):
        real = mask[row].bool()
        alone = ids[row, real].unsqueeze(0)
        assert torch.equal(routed[row, real], logits_of(toy_world.base, alone, torch.ones_like(alone))[0])


def tied_copy(path, out):
    """The model at ``path`` with its LM head tied to its embeddings (as SmolLM2's), saved to ``out``."""
    untied = AutoModelForCausalLM.from_pretrained(path)
    config = untied.config
    config.tie_word_embeddings = True
    tied = type(untied)(config)
    state = {name: t for name, t in untied.state_dict().items() if name != "lm_head.weight"}
    tied.load_state_dict(state, strict=False)
    tied.save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return out


def test_tied_embeddings_route_the_head_with_the_embeddings(toy_world, items, batch, tmp_path):
    # SmolLM2 ties its LM head to its embeddings: the checkpoint has no lm_head.weight, and each row's head
    # must be its routed embedding matrix, or a one-hot router gives the shared head, not the expert's.
    base = tied_copy(toy_world.base, tmp_path / "base")
    tied = [str(tied_copy(path, tmp_path / f"expert{i}")) for i, path in enumerate(experts(toy_world))]
    twin, summary = twin_from_shared(base, tied, items, energy=1.0)
    assert "lm_head.weight" not in twin.config.twin_ranks and "model.embed_tokens.weight" in twin.config.twin_ranks
    ids, mask = batch
    real = mask.bool()
    with torch.no_grad():
        for expert, path in enumerate(tied):
            one_hot = torch.nn.functional.one_hot(torch.tensor([expert, expert]), 2).float()
            routed = twin.forward_routed(ids, mask, one_hot).logits
            torch.testing.assert_close(routed[real], logits_of(path, ids, mask)[real], atol=2e-4, rtol=0)
        recipe = Recipe(method="linear", models=tuple(ModelEntry(model=path) for path in tied))
        out = write_twin(twin, AutoTokenizer.from_pretrained(base), recipe, summary, tmp_path / "twin")
        reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        assert reloaded.config.tie_word_embeddings
        before, after = (m(input_ids=ids, attention_mask=mask).logits for m in (twin, reloaded))
    torch.testing.assert_close(before, after, atol=1e-5, rtol=0)


def test_the_router_is_the_same_from_the_same_seed():
    features = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    labels = (features[:, 0] > 0).long()
    first, again, other = (train_router(features, labels, num_experts=2, seed=s, steps=50) for s in (0, 0, 1))
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name])
    assert not torch.equal(first.outer.weight, other.outer.weight)
    # It learns the rule it was shown: the label is the sign of the first feature.
    assert (first(features).argmax(dim=1) == labels).float().mean() > 0.9


def test_the_exported_folder_reloads_with_the_same_logits_and_scores(toy_world, items, tmp_path, batch):
    twin, summary = twin_from_shared(toy_world.base, experts(toy_world), items, svd_rank=4)
    tokenizer = AutoTokenizer.from_pretrained(toy_world.base)
    recipe = Recipe(method="linear", models=tuple(ModelEntry(model=str(toy_world.base)) for _ in range(2)))
    out = write_twin(twin, tokenizer, recipe, summary, tmp_path / "twin")
    card = (out / "README.md").read_text()
    assert "trust_remote_code=True" in card and f"{summary.kept_bytes:,} bytes" in card
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(reloaded).__module__ != type(twin).__module__  # the folder's own copy of the code ran
    ids, mask = batch
    assert mask[1, :-1].all() and not mask[1, -1]
    with torch.no_grad():
        before = twin(input_ids=ids, attention_mask=mask).logits
        together = reloaded(input_ids=ids, attention_mask=mask).logits
        alone = reloaded(input_ids=ids[1:, :-1], attention_mask=mask[1:, :-1]).logits
        weights = reloaded.route(ids, mask)
    # Equal to float32 rounding, not bit for bit: the same code, loaded through another module, gives the
    # padded row's matmuls differently aligned inputs (measured: at most 7e-7 of logits near 1).
    torch.testing.assert_close(before, together, atol=1e-5, rtol=0)
    # Each row is routed on its own: the padded row in a batch gives what it gives alone (to float32 rounding: the
    # rows run batched, and a matmul over two rows may round one of them differently from one row alone).
    torch.testing.assert_close(together[1, :-1], alone[0], atol=1e-5, rtol=0)
    assert not torch.allclose(weights[0], weights[1])
    tasks = TaskSet(names=tuple(TASKS), include_path=str(toy_world.tasks_dir), limit=8, batch_size=4)
    scored = LMEvalScorer(model=twin, tokenizer=tokenizer, tasks=tasks).score()
    assert LMEvalScorer(model=reloaded, tokenizer=tokenizer, tasks=tasks).score() == scored
    assert {"toy_math/acc", "toy_lang/acc"} <= set(scored)


def test_the_cli_builds_a_twin_model_from_a_recipe_file(toy_world, tmp_path, capsys):
    recipe = Recipe.from_plain(
        {
            "method": "task_arithmetic",
            "base": str(toy_world.base),
            "models": [{"model": path, "weight": 1.0} for path in experts(toy_world)],
        }
    )
    (tmp_path / "shared.yaml").write_text(recipe.to_yaml())
    args = ["twin", str(tmp_path / "shared.yaml"), str(tmp_path / "twin"), "--energy", "0.5", "--tasks", "toy_lang"]
    assert main([*args, "--include-path", str(toy_world.tasks_dir)]) == 0
    assert "exclusive parts" in capsys.readouterr().out
    assert (tmp_path / "twin" / "modeling_twin.py").is_file()


def test_a_data_flow_source_is_refused(toy_world, tmp_path):
    recipe = tmp_path / "dfs.yaml"
    recipe.write_text(
        f"kind: dataflow\nsources: [{toy_world.base}, {toy_world.experts['math']}]\nembedding_source: 0\n"
        "path:\n  - {source: 1, layer: 0, scale: 1.0}\n  - {source: 0, layer: 1, scale: 1.0}\nmax_path_length: 4\n"
    )
    with pytest.raises(EvomergeError, match="not a parameter-space merge") as error:
        build_twin(recipe, tmp_path / "out", svd_rank=1, tasks=TASKS, include_path=str(toy_world.tasks_dir))
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def test_experts_of_another_shape_are_refused(toy_world, items):
    wrong = [str(toy_world.experts["math"]), str(toy_world.incompatible["hidden"])]
    with pytest.raises(EvomergeError, match="expert 1 has shape .* same base model"):
        twin_from_shared(toy_world.base, wrong, items, svd_rank=1)


def test_a_rank_above_the_matrix_size_is_refused(toy_world, items):
    with pytest.raises(EvomergeError, match="rank 33 is above the size of .* use a rank from 0 to 32"):
        twin_from_shared(toy_world.base, experts(toy_world), items, svd_rank=33)


def test_a_data_flow_run_is_refused(toy_world, tmp_path):
    run_dir = tmp_path / "dfs-run"
    dfs = ["genome=dfs", "genome.embedding_source=2", "budget.evaluations=4", "tasks.limit=4"]
    assert main(["search", *overrides(toy_world, run_dir, *dfs)]) == 0
    with pytest.raises(EvomergeError, match="DataFlowRecipe .* not a parameter-space merge"):
        build_twin(run_dir, tmp_path / "out", svd_rank=1)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["phi3", "gemma3_text"])
def test_an_unsupported_family_is_refused_before_anything_is_merged(toy_world, tmp_path, monkeypatch, family):
    # Issue 32: a Gemma 3 run was refused only after two minutes and 9 GB of merging. The family is in the configs.
    model_type, extra = FAMILIES[family]
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **SIZES, num_hidden_layers=1, **extra))
    for name in ("base", "expert1", "expert2"):
        model.save_pretrained(tmp_path / name)
    recipe = Recipe.from_plain(
        {
            "method": "task_arithmetic",
            "base": str(tmp_path / "base"),
            "models": [{"model": str(tmp_path / name), "weight": 1.0} for name in ("expert1", "expert2")],
        }
    )
    (tmp_path / "shared.yaml").write_text(recipe.to_yaml())

    def spent(*args, **kwargs):
        raise AssertionError("work was done before the family was checked")

    monkeypatch.setattr("evomerge.twin.build.write_shared", spent)
    monkeypatch.setattr("evomerge.twin.items.task_items", spent)
    with pytest.raises(EvomergeError, match=f"no modeling code for the '{model_type}' family") as error:
        build_twin(tmp_path / "shared.yaml", tmp_path / "out", svd_rank=1, tasks=TASKS)
    assert "use a model of one of these families: llama, mistral, qwen2, qwen3" in str(error.value)
    assert not (tmp_path / "out").exists()
