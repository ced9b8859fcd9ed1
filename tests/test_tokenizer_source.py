"""tokenizer_source (base | union | a model): rows matched by token text, as mergekit 0.1.5 does.

Three toy experts with other vocabularies than the base's (111 words): ``tool`` is the lang expert
with one added token ``<tool>`` (its rows set to known values), ``padded`` is the math expert with its
embeddings resized to 120 rows (a tokenizer of 111, so 9 rows no token reads), and ``tool2`` is the math
expert with ``<tool>`` added too, with other rows.
"""

from __future__ import annotations

import subprocess

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.errors import EvomergeError
from evomerge.io.checkpoint import Checkpoint
from evomerge.materialize.in_place import InPlaceMerger
from evomerge.materialize.to_disk import merge_to_disk
from evomerge.materialize.vocabulary import _donors
from evomerge.recipe.mergekit import to_mergekit
from evomerge.recipe.recipe import Recipe
from tests.test_mergekit_parity import MERGEKIT_PYTHON, RUN_ALL

TOOL = "<tool>"
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
# Rows of <tool>: (embedding, head) values in each expert that has it.
TOOL_ROWS = {"tool": (1.0, 2.0), "tool2": (0.5, -1.0)}
WEIGHTS = {"tool": 0.5, "padded": 0.3, "tool2": 0.2}


def _expert(source, out, *, added: tuple[float, float] | None = None, rows: int | None = None):
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    if added is not None:
        tokenizer.add_tokens([TOOL])
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        new = tokenizer.convert_tokens_to_ids(TOOL)
        with torch.no_grad():
            model.get_input_embeddings().weight[new] = added[0]
            model.get_output_embeddings().weight[new] = added[1]
    if rows is not None:
        old = model.get_input_embeddings().weight.shape[0]
        model.resize_token_embeddings(rows, mean_resizing=False)
        with torch.no_grad():  # rows no token reads: a merge must drop them, never average them in
            model.get_input_embeddings().weight[old:] = 9.0
            model.get_output_embeddings().weight[old:] = 9.0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def experts(toy_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    return {
        "tool": _expert(toy_world.experts["lang"], root / "tool", added=TOOL_ROWS["tool"]),
        "padded": _expert(toy_world.experts["math"], root / "padded", rows=120),
        "tool2": _expert(toy_world.experts["math"], root / "tool2", added=TOOL_ROWS["tool2"]),
    }


def recipe(toy_world, experts, tokenizer_source: str | None, names=("tool", "padded", "tool2")) -> Recipe:
    return Recipe.from_plain(
        {
            "method": "task_arithmetic",
            "base": str(toy_world.base),
            "models": [{"model": str(experts[n]), "weight": WEIGHTS[n]} for n in names],
            "dtype": "float32",
            "tokenizer_source": tokenizer_source,
        }
    )


def sources_of(experts) -> dict[str, str]:
    """The tokenizer_source values under test, by mode."""
    return {"base": "base", "union": "union", "model": str(experts["tool"])}


def test_missing_token_rule_is_mergekits():
    # Rows: tokens; columns: base, then two models. mergekit's assign_embedding_sources: one holder
    # gives its row; else the base's if it has it; else the mean of the holders; none: zeros.
    present = torch.tensor(
        [[False, True, False], [True, True, False], [False, True, True], [False, False, False], [True, False, False]]
    )
    expected = [
        [False, True, False],
        [True, False, False],
        [False, True, True],
        [False, False, False],
        [True, False, False],
    ]
    assert _donors(present, has_base=True).tolist() == expected
    # Without a base (linear): holders are averaged whoever they are.
    assert _donors(present, has_base=False)[1].tolist() == [True, True, False]


@pytest.mark.parametrize("mode", ["base", "union", "model"])
def test_added_token_rows_worked_by_hand(toy_world, experts, tmp_path, mode):
    out = merge_to_disk(recipe(toy_world, experts, sources_of(experts)[mode]), tmp_path / "out")
    merged = Checkpoint.open(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = Checkpoint.open(toy_world.base)
    if mode == "base":
        # The base's 111 words; <tool> and padded's 9 unread rows are gone.
        assert len(tokenizer) == 111 and TOOL not in tokenizer.get_vocab()
        assert merged.shape(EMBED) == (111, 32) and merged.config["vocab_size"] == 111
    else:
        # Union and tool's vocabulary: the base's words, then <tool> at 111.
        assert len(tokenizer) == 112 and tokenizer.convert_tokens_to_ids(TOOL) == 111
        assert merged.shape(EMBED) == (112, 32) and merged.config["vocab_size"] == 112
        for name, column in ((EMBED, 0), (HEAD, 1)):
            tool, tool2 = TOOL_ROWS["tool"][column], TOOL_ROWS["tool2"][column]
            # The base and padded lack <tool>; two experts have it and the base does not, so both take
            # their mean m, and task arithmetic gives m + 0.5 (tool - m) + 0.3 (m - m) + 0.2 (tool2 - m).
            mean = (tool + tool2) / 2
            hand = mean + 0.5 * (tool - mean) + 0.2 * (tool2 - mean)
            torch.testing.assert_close(merged.load(name)[111], torch.full((32,), hand), rtol=0, atol=1e-6)
    # A word every model has keeps the plain task-arithmetic merge of its own rows.
    word = tokenizer.convert_tokens_to_ids("<bos>")
    rows = {n: Checkpoint.open(experts[n]).load(EMBED)[word] for n in WEIGHTS}
    b = base.load(EMBED)[word]
    hand = b + sum(WEIGHTS[n] * (rows[n] - b) for n in WEIGHTS)
    torch.testing.assert_close(merged.load(EMBED)[word], hand, rtol=0, atol=1e-6)


def test_a_token_one_model_has_takes_its_row(toy_world, experts, tmp_path):
    out = merge_to_disk(recipe(toy_world, experts, "union", names=("tool", "padded")), tmp_path / "out")
    merged = Checkpoint.open(out)
    # Only tool has <tool>: every source reads tool's row, so the task vectors are zero there.
    torch.testing.assert_close(merged.load(EMBED)[111], torch.full((32,), TOOL_ROWS["tool"][0]), rtol=0, atol=0)
    torch.testing.assert_close(merged.load(HEAD)[111], torch.full((32,), TOOL_ROWS["tool"][1]), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["base", "union", "model"])
def test_in_place_equals_to_disk_and_output_reloads(toy_world, experts, tmp_path, mode):
    r = recipe(toy_world, experts, sources_of(experts)[mode])
    out = merge_to_disk(r, tmp_path / "out")
    live = AutoModelForCausalLM.from_pretrained(toy_world.base)
    merger = InPlaceMerger(model=live, template=r)
    merger.materialize(r)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    state = reloaded.state_dict()
    for name, value in live.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0, msg=name)
    assert live.config.vocab_size == reloaded.config.vocab_size
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert merger.tokenizer.get_vocab() == tokenizer.get_vocab()
    if mode != "base":
        ids = tokenizer("<bos> " + TOOL, add_special_tokens=False)["input_ids"]
        assert ids == [tokenizer.convert_tokens_to_ids("<bos>"), 111]
        logits = reloaded(torch.tensor([ids])).logits
        assert logits.shape[-1] == 112 and torch.isfinite(logits).all()


def test_a_search_worker_scores_in_the_output_vocabulary(toy_world, experts):
    from evomerge.evaluate.lm_eval_scorer import TaskSet
    from evomerge.executor.worker import Worker, WorkerSpec

    template = recipe(toy_world, experts, "union")
    tasks = TaskSet(names=(toy_world.tasks["lang"],), include_path=str(toy_world.tasks_dir), limit=2)
    worker = Worker(WorkerSpec(template=template, tasks=tasks))
    assert worker.merger.model.get_input_embeddings().weight.shape == (112, 32)
    assert worker.merger.tokenizer.convert_tokens_to_ids(TOOL) == 111
    outcome = worker.evaluate(template)
    assert outcome.error is None and outcome.metrics


@pytest.mark.skipif(
    not MERGEKIT_PYTHON, reason="set EVOMERGE_MERGEKIT_PYTHON to a python with mergekit 0.1.5 (make test does)"
)
def test_same_tensors_and_vocabulary_as_mergekit(toy_world, experts, tmp_path):
    modes = sources_of(experts)
    args = []
    for mode, source in modes.items():
        config = tmp_path / f"{mode}.yml"
        config.write_text(yaml.safe_dump(to_mergekit(recipe(toy_world, experts, source))))
        args += [str(config), str(tmp_path / f"mergekit-{mode}")]
    subprocess.run([MERGEKIT_PYTHON, "-c", RUN_ALL, *args], check=True, capture_output=True)
    for mode, source in modes.items():
        ours_dir = merge_to_disk(recipe(toy_world, experts, source), tmp_path / f"evomerge-{mode}")
        ours, theirs = Checkpoint.open(ours_dir), Checkpoint.open(tmp_path / f"mergekit-{mode}")
        assert sorted(ours.names) == sorted(theirs.names)
        worst = max((ours.load(n) - theirs.load(n)).abs().max().item() for n in ours.names)
        assert worst <= 1e-5, f"{mode}: max |evomerge - mergekit| = {worst}"
        assert ours.config["vocab_size"] == theirs.config["vocab_size"]
        vocab = AutoTokenizer.from_pretrained(ours_dir).get_vocab()
        assert vocab == AutoTokenizer.from_pretrained(tmp_path / f"mergekit-{mode}").get_vocab(), mode


def test_tokenizer_source_must_be_a_merged_model(toy_world, experts, tmp_path):
    with pytest.raises(EvomergeError) as caught:
        merge_to_disk(recipe(toy_world, experts, str(toy_world.experts["lang"])), tmp_path / "out")
    message = str(caught.value)
    assert "tokenizer_source" in message and "neither 'base', 'union' nor one of the models" in message
    assert not (tmp_path / "out").exists()


def test_differing_vocabularies_need_a_tokenizer_source(toy_world, experts, tmp_path):
    for name in ("tool", "padded"):
        with pytest.raises(EvomergeError) as caught:
            merge_to_disk(recipe(toy_world, experts, None, names=(name,)), tmp_path / "out")
        message = str(caught.value)
        assert "vocabularies differ" in message and "tokenizer_source: base" in message
        assert not (tmp_path / "out").exists()


def _tied(source, out):
    model = AutoModelForCausalLM.from_pretrained(source, tie_word_embeddings=True)
    model.tie_weights()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def test_tied_sources_stay_tied_in_the_output_vocabulary(toy_world, experts, tmp_path):
    tied = {"base": _tied(toy_world.base, tmp_path / "base"), "tool": _tied(experts["tool"], tmp_path / "tool")}
    assert HEAD not in Checkpoint.open(tied["tool"]).names
    r = Recipe.from_plain(
        {
            "method": "task_arithmetic",
            "base": str(tied["base"]),
            "models": [{"model": str(tied["tool"]), "weight": 0.5}],
            "tokenizer_source": "union",
        }
    )
    out = merge_to_disk(r, tmp_path / "out")
    merged = Checkpoint.open(out)
    assert HEAD not in merged.names and merged.shape(EMBED) == (112, 32)
    # Only tool has <tool>: the base reads tool's row, and the task vector is zero there.
    torch.testing.assert_close(merged.load(EMBED)[111], torch.full((32,), TOOL_ROWS["tool"][0]), rtol=0, atol=0)
    live = AutoModelForCausalLM.from_pretrained(tied["base"])
    InPlaceMerger(model=live, template=r).materialize(r)
    assert live.get_output_embeddings().weight is live.get_input_embeddings().weight
    torch.testing.assert_close(live.get_input_embeddings().weight, merged.load(EMBED), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["base", "union", "model"])
def test_mergekit_configs_keep_their_tokenizer_source(toy_world, experts, mode):
    from evomerge.recipe.mergekit import from_mergekit

    source = str(experts["tool"]) if mode == "model" else mode
    ours = recipe(toy_world, experts, source)
    assert from_mergekit(to_mergekit(ours)).tokenizer_source == source


def test_mergekits_tokenizer_block_is_refused_naming_tokenizer_source():
    from evomerge.recipe.mergekit import from_mergekit

    config = {"merge_method": "linear", "models": [{"model": "a"}], "tokenizer": {"source": "union"}}
    with pytest.raises(EvomergeError) as refused:
        from_mergekit(config)
    assert "'tokenizer:' block" in str(refused.value) and "tokenizer_source: base" in str(refused.value)


def test_a_search_config_sets_the_tokenizer_source(toy_world, experts):
    from hydra import compose, initialize_config_dir

    from evomerge.config import CONF_DIR, check_config, register_configs
    from evomerge.search.session import template_recipe

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"models.base={toy_world.base}",
                f"models.experts=[{experts['tool']},{experts['padded']}]",
                "models.tokenizer_source=union",
                "tasks.names=[toy_math]",
                "objectives=[{name: m, terms: {toy_math/acc: 1.0}}]",
                "dtype=float32",  # start() resolves the default `auto` before the template is built
            ],
        )
    check_config(cfg)
    assert template_recipe(cfg).tokenizer_source == "union"
