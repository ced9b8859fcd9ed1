"""A worker's reserve for scoring follows the lengths of the tasks' real requests, not full-length batches: on a
tiny Gemma 3 with a 262,144-token vocabulary, where full-length float32 logits are what the reserve is made of."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from evomerge.evaluate.lm_eval_scorer import TaskSet
from evomerge.evaluate.request_lengths import request_lengths
from evomerge.executor.reserve import default_reserve
from evomerge.executor.worker import WorkerSpec, scoring_reserve
from tests.families import FAMILIES, SIZES
from tests.test_executor_memory import recipe

VOCABULARY = 262_144
# The toy tokenizer is word-level with a BOS token: a prompt of n words is n + 1 tokens, " 6" one token.
SCORED = [("one two three four five six seven eight nine", " 6"), ("three plus three is", " 6")]
GENERATED = ["two plus two is", "one"]


def write_task(folder: Path, name: str, output_type: str, rows: list[dict], extra: str = "") -> None:
    (folder / name).mkdir(parents=True)
    data = folder / name / "test.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / name / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        f"output_type: {output_type}\ndoc_to_text: prompt\ndoc_to_target: target\n{extra}"
        "metric_list:\n- metric: acc\n  aggregation: mean\n  higher_is_better: true\n"
    )


@pytest.fixture(scope="module")
def large_vocabulary(toy_world, tmp_path_factory) -> Path:
    """A tiny Gemma 3 (tests/families.py) with Gemma 3's vocabulary, saved with the toy world's tokenizer."""
    folder = tmp_path_factory.mktemp("gemma3-262k")
    model_type, extra = FAMILIES["gemma3_text"]
    config = AutoConfig.for_model(model_type, **{**SIZES, **extra, "vocab_size": VOCABULARY, "hidden_size": 16})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(toy_world.base) / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    write_task(folder, "scored", "loglikelihood", [{"prompt": p, "target": t} for p, t in SCORED])
    generation = "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 5\n"
    write_task(folder, "generated", "generate_until", [{"prompt": p, "target": "4"} for p in GENERATED], generation)
    write_task(folder, "rolling", "loglikelihood_rolling", [{"prompt": "one", "target": "one"}])
    return folder


def spec_for(toy_world, tasks_dir: Path, *names: str) -> WorkerSpec:
    tasks = TaskSet(names=names, include_path=str(tasks_dir), batch_size=4)
    return WorkerSpec(template=recipe(toy_world, "ties"), tasks=tasks)


def test_the_reserve_follows_the_longest_requests(toy_world, tasks_dir, large_vocabulary):
    config = json.loads((large_vocabulary / "config.json").read_text())
    spec = spec_for(toy_world, tasks_dir, "scored", "generated")
    lengths = request_lengths(spec.tasks, AutoTokenizer.from_pretrained(large_vocabulary))
    # BOS, 9 words and " 6"; BOS, 4 words and 5 generated tokens.
    assert (lengths.scored, lengths.generated) == (1 + 9 + 1, 1 + 4 + 5)
    reserve = scoring_reserve(spec, large_vocabulary)
    layers, kv_heads, head_dim = config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]
    hidden, intermediate = config["hidden_size"], config["intermediate_size"]
    # Batch 4 in float32: the scored requests' logits at every one of their 11 positions (the logits and their
    # log-softmax, 4 + 4 bytes), the KV cache and activations of the longer (11 tokens against 10).
    assert reserve == {
        "KV cache": 2 * layers * kv_heads * head_dim * 4 * 11 * 4,
        "logits": 4 * 11 * VOCABULARY * (4 + 4),
        "activations": 4 * 11 * (4 * hidden + 2 * intermediate) * 4,
    }
    # Full-length requests (the model's 64-token context) would need 64 / 11 of it: 5.8x more.
    worst = default_reserve(config, dtype="float32", batch_size=4, max_length=None)
    assert worst == sum(reserve.values()) * 64 // 11


def test_a_generation_keeps_the_last_positions_logits(toy_world, tasks_dir, large_vocabulary):
    reserve = scoring_reserve(spec_for(toy_world, tasks_dir, "generated"), large_vocabulary)
    assert reserve["logits"] == 4 * 1 * VOCABULARY * (4 + 4)


def test_requests_of_unknown_length_keep_the_worst_case(toy_world, tasks_dir, large_vocabulary):
    config = json.loads((large_vocabulary / "config.json").read_text())
    reserve = scoring_reserve(spec_for(toy_world, tasks_dir, "scored", "rolling"), large_vocabulary)
    assert sum(reserve.values()) == default_reserve(config, dtype="float32", batch_size=4, max_length=None)
