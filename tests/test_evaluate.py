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


def copy_task(world, skill: str, folder, name: str, **changes) -> None:
    """The toy world's task for ``skill`` under a new name in ``folder``, with ``changes`` to its YAML."""
    source = world.tasks_dir / world.tasks[skill]
    config = yaml.safe_load((source / f"{world.tasks[skill]}.yaml").read_text())
    config.pop("tag", None)
    config.update(task=name, **changes)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))


def test_a_group_reports_its_aggregate_and_each_subtask(toy_world, tmp_path):
    copy_task(toy_world, "math", tmp_path, "mine_math")
    copy_task(toy_world, "lang", tmp_path, "mine_lang")
    group = {
        "group": "mine",
        "task": ["mine_math", "mine_lang"],
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": False}],
    }
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(group))
    model, tokenizer = load(toy_world)
    tasks = TaskSet(names=("mine",), include_path=str(tmp_path), limit=6, num_fewshot={"mine": 1})
    scorer = LMEvalScorer(model=model, tokenizer=tokenizer, tasks=tasks)
    assert sorted(scorer.loaded["tasks"]) == ["mine_lang", "mine_math"]
    # The group's few-shot count reaches its subtasks.
    assert all(task.get_config("num_fewshot") == 1 for task in scorer.loaded["tasks"].values())
    metrics = scorer.score()
    assert set(metrics) == {"mine/acc", "mine_math/acc", "mine_lang/acc"}
    # Unweighted mean of the two subtasks, worked by hand from their own numbers.
    assert metrics["mine/acc"] == pytest.approx((metrics["mine_math/acc"] + metrics["mine_lang/acc"]) / 2)
    with pytest.raises(EvomergeError, match="use one of: mine/acc, mine_lang/acc, mine_math/acc"):
        weighted_sum(metrics, {"mine/exact_match": 1.0})


def test_named_filters_stay_distinct_and_generation_kwargs_reach_the_task(toy_world, tmp_path):
    # gsm8k's layout: one generate_until task, one metric, two filters ("strict-match" and "flexible-extract").
    copy_task(
        toy_world,
        "math",
        tmp_path,
        "mine_gen",
        output_type="generate_until",
        doc_to_target="answer",
        generation_kwargs={"until": ["\n"], "do_sample": False, "max_gen_toks": 4},
        metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        filter_list=[
            {"name": "strict-match", "filter": [{"function": "regex", "regex_pattern": "^ ?(\\d+)$"}, {"function": "take_first"}]},
            {"name": "flexible-extract", "filter": [{"function": "regex", "regex_pattern": "(\\d+)", "group_select": -1}, {"function": "take_first"}]},
        ],
    )  # fmt: skip
    model, tokenizer = load(toy_world)
    tasks = TaskSet(names=("mine_gen",), include_path=str(tmp_path), limit=4, gen_kwargs={"max_gen_toks": 2})
    scorer = LMEvalScorer(model=model, tokenizer=tokenizer, tasks=tasks)
    assert scorer.loaded["tasks"]["mine_gen"].get_config("generation_kwargs")["max_gen_toks"] == 2
    assert set(scorer.score()) == {"mine_gen/exact_match,strict-match", "mine_gen/exact_match,flexible-extract"}


def test_the_chat_template_and_system_instruction_are_rendered_into_the_requests(toy_world, tmp_path):
    copy_task(toy_world, "math", tmp_path, "mine_chat")
    model, tokenizer = load(toy_world)
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    plain = LMEvalScorer(
        model=model, tokenizer=tokenizer, tasks=TaskSet(names=("mine_chat",), include_path=str(tmp_path), limit=2)
    )
    plain.score()
    chat = LMEvalScorer(
        model=model,
        tokenizer=tokenizer,
        tasks=TaskSet(
            names=("mine_chat",),
            include_path=str(tmp_path),
            limit=2,
            apply_chat_template=True,
            system_instruction="Answer with a numeral.",
        ),
    )
    chat.score()
    [before] = {instance.args[0] for instance in plain.loaded["tasks"]["mine_chat"].instances[:1]}
    [after] = {instance.args[0] for instance in chat.loaded["tasks"]["mine_chat"].instances[:1]}
    assert not before.startswith("<|")
    assert after.startswith("<|system|>Answer with a numeral.<|user|>") and after.endswith("<|assistant|>")
    assert before.strip() in after
