"""lm-eval scoring of a loaded model: weights changed in place are seen, test splits of benchmarks warn."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.errors import EvomergeError
from evomerge.evaluate.lm_eval_scorer import LMEvalScorer, TaskSet, is_well_known, weighted_sum


def load(world):
    return AutoModelForCausalLM.from_pretrained(world.base, dtype=torch.float32), AutoTokenizer.from_pretrained(
        world.base
    )


def test_scores_follow_in_place_weight_changes(toy_world):
    model, tokenizer = load(toy_world)
    tasks = TaskSet(names=(toy_world.tasks["math"],), include_path=str(toy_world.tasks_dir), limit=10)
    scorer = LMEvalScorer(model=model, tokenizer=tokenizer, tasks=tasks)
    before = scorer.score()
    assert set(before) == {f"{toy_world.tasks['math']}/acc"}
    assert scorer.score() == before  # deterministic
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit equal: greedy picks token 0, never the answer
    assert scorer.score()[f"{toy_world.tasks['math']}/acc"] == 0.0


def test_a_benchmark_test_split_warns_unless_acknowledged(toy_world, tmp_path):
    source = toy_world.tasks_dir / toy_world.tasks["math"]
    folder = tmp_path / "mmlu_lookalike"
    shutil.copytree(source, folder)
    config_path = folder / f"{toy_world.tasks['math']}.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["task"] = "mmlu_lookalike"
    config.pop("tag", None)
    config_path.write_text(yaml.safe_dump(config))
    model, tokenizer = load(toy_world)
    tasks = TaskSet(names=("mmlu_lookalike",), include_path=str(tmp_path), limit=4)
    with pytest.warns(UserWarning, match="TEST split of a well-known benchmark"):
        LMEvalScorer(model=model, tokenizer=tokenizer, tasks=tasks)
    quiet = TaskSet(names=("mmlu_lookalike",), include_path=str(tmp_path), limit=4, acknowledge_test_split=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        LMEvalScorer(model=model, tokenizer=tokenizer, tasks=quiet)


@pytest.mark.parametrize(
    ("name", "known"),
    [("mgsm_direct_ja", True), ("ja_leaderboard_mgsm", True), ("leaderboard_bbh_navigate", True),
     ("MMLU_stem", True), ("toy_math", False), ("ja_leaderboard_my_task", False), ("my_gsm8k_copy", False)],
)  # fmt: skip
def test_well_known_benchmarks_are_recognised_under_suite_prefixes(name: str, known: bool) -> None:
    assert is_well_known(name) is known


def test_unknown_task_and_missing_metric_are_named(toy_world):
    model, tokenizer = load(toy_world)
    with pytest.raises(EvomergeError, match="no task named 'toy_nope'"):
        LMEvalScorer(
            model=model, tokenizer=tokenizer, tasks=TaskSet(names=("toy_nope",), include_path=str(toy_world.tasks_dir))
        )
    with pytest.raises(EvomergeError, match="toy_math/f1"):
        weighted_sum({"toy_math/acc": 0.5}, {"toy_math/f1": 1.0})
    assert weighted_sum({"a/acc": 0.5, "b/acc": 0.25}, {"a/acc": 2.0, "b/acc": 4.0}) == 2.0  # 2*.5 + 4*.25
