"""The large objective and held-out tasks (evomerge/toy/large_tasks.py, evomerge/toy/smollm/large_tasks.py):
big enough, built from disjoint problems, the same on every call, readable by the models, and added to a
cached world without touching its own tasks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from lm_eval.tasks import TaskManager
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.evaluate.lm_eval_scorer import LMEvalScorer, TaskSet
from evomerge.toy import ToyWorld
from evomerge.toy.language import NUMBER_WORDS as TOY_NUMBER_WORDS
from evomerge.toy.language import translate
from evomerge.toy.large_tasks import VARIANTS, large_tasks, with_contexts
from evomerge.toy.smollm.large_tasks import VARIANTS as SMOL_VARIANTS
from evomerge.toy.smollm.large_tasks import context
from evomerge.toy.smollm.skills import NUMBER_WORDS, task_items
from evomerge.toy.tasks import write_missing_tasks
from evomerge.toy.world import load_world


@pytest.fixture
def cached_world(toy_world: ToyWorld, tmp_path: Path) -> ToyWorld:
    """A copy of the tiny world, so that adding tasks never touches the shared cache."""
    return load_world(Path(shutil.copytree(toy_world.root, tmp_path / toy_world.root.name)))


def items(world: ToyWorld, name: str) -> list[dict]:
    return [json.loads(line) for line in (world.tasks_dir / name / "test.jsonl").read_text().splitlines()]


def test_toy_large_tasks_ask_every_problem_several_ways_on_disjoint_halves(cached_world: ToyWorld) -> None:
    search, holdout = large_tasks(cached_world)
    assert (search, holdout) == ("toy_combined_large", "toy_combined_large_holdout")
    large = {name: items(cached_world, name) for name in (search, holdout)}
    assert len(large[search]) == 94 * VARIANTS >= 1000 and len(large[holdout]) == 93 * VARIANTS >= 500
    for name, original in ((search, "toy_combined"), (holdout, "toy_combined_holdout")):
        questions = {row["prompt"]: row["answer"] for row in items(cached_world, original)}
        assert len({row["prompt"] for row in large[name]}) == len(large[name])  # no item twice
        for row in large[name]:
            # The question is the prompt's last four words ("A op B is", in L2); its answer is unchanged.
            question = " ".join(row["prompt"].split()[-4:])
            assert questions[question] == row["answer"] and row["target"] == f" {row['answer']}"
        asked = [" ".join(row["prompt"].split()[-4:]) for row in large[name]]
        assert all(asked.count(question) == VARIANTS for question in questions)
    search_questions = {" ".join(row["prompt"].split()[-4:]) for row in large[search]}
    assert not search_questions & {" ".join(row["prompt"].split()[-4:]) for row in large[holdout]}


def test_toy_contexts_are_l2_words_the_tokenizer_knows_and_hold_no_number(cached_world: ToyWorld) -> None:
    search, holdout = large_tasks(cached_world)
    tokenizer = AutoTokenizer.from_pretrained(cached_world.base)
    for name in (search, holdout):
        for row in items(cached_world, name):
            *context_words, _, _, _, _ = row["prompt"].split()
            assert tokenizer.unk_token_id not in tokenizer(row["prompt"])["input_ids"]
            # No number word: one in the context pulls the answer away from the question's (large_tasks.py).
            assert not any(word.isdigit() for word in context_words)
            assert not set(context_words) & {translate(word) for word in TOY_NUMBER_WORDS}
            assert all(word.endswith("u") or word in (".", ",") for word in context_words)  # L2 spellings


def test_large_tasks_are_written_once_the_same_way_and_leave_the_world_as_it_was(
    cached_world: ToyWorld, toy_world: ToyWorld, tmp_path: Path
) -> None:
    before = {path.relative_to(cached_world.root): path.read_bytes() for path in cached_world.root.rglob("*.*")}
    names = large_tasks(cached_world)
    after = {path.relative_to(cached_world.root): path.read_bytes() for path in cached_world.root.rglob("*.*")}
    assert {path: after[path] for path in before} == before  # the models and the world's own tasks
    assert sorted({path.parts[1] for path in set(after) - set(before)}) == sorted(names)
    written = {name: (cached_world.tasks_dir / name / "test.jsonl").stat().st_mtime_ns for name in names}
    assert large_tasks(cached_world) == names  # already there: left alone
    assert {name: (cached_world.tasks_dir / name / "test.jsonl").stat().st_mtime_ns for name in names} == written
    other = load_world(Path(shutil.copytree(toy_world.root, tmp_path / "other" / toy_world.root.name)))
    large_tasks(other)
    for name in names:
        assert items(other, name) == items(cached_world, name)
    assert not list(cached_world.root.glob(".*tmp*"))  # no staging folder left behind


def test_toy_large_tasks_load_whole_and_score_in_lm_eval(cached_world: ToyWorld) -> None:
    names = large_tasks(cached_world)
    tokenizer = AutoTokenizer.from_pretrained(cached_world.base)
    model = AutoModelForCausalLM.from_pretrained(cached_world.experts["math"])
    # A subsample is scored (every item would take half a minute here); every item is loaded.
    tasks = TaskSet(names=names, include_path=str(cached_world.tasks_dir), limit=40)
    scorer = LMEvalScorer(model=model, tokenizer=tokenizer, tasks=tasks)
    scores = scorer.score()
    for name in names:
        assert len(scorer.loaded["tasks"][name].eval_docs) == len(items(cached_world, name))
        assert scores[f"{name}/acc"] * 40 == pytest.approx(round(scores[f"{name}/acc"] * 40))


def test_smollm_large_tasks_sizes_halves_and_determinism(tmp_path: Path) -> None:
    halves = task_items(0)
    large = {
        half: with_contexts(halves[half]["combined"], variants=SMOL_VARIANTS, context=context, seed="0")
        for half in ("search", "holdout")
    }
    assert len(large["search"].prompts) == 50 * SMOL_VARIANTS >= 500 and len(large["holdout"].prompts) >= 300
    sums = {half: {"Sum: " + prompt.rpartition("Sum: ")[2] for prompt in large[half].prompts} for half in large}
    assert sums["search"] == set(halves["search"]["combined"].prompts) and len(sums["search"]) == 50
    assert not sums["search"] & sums["holdout"]
    for prompt in large["search"].prompts:
        assert not any(word.strip(".") in NUMBER_WORDS for word in prompt.rpartition("Sum: ")[0].split())
    again = with_contexts(halves["search"]["combined"], variants=SMOL_VARIANTS, context=context, seed="0")
    assert again == large["search"]
    write_missing_tasks(list(large.values()), tmp_path)
    loaded = TaskManager(include_path=str(tmp_path), include_defaults=False).load(
        [item.name for item in large.values()]
    )
    assert {name: len(task.eval_docs) for name, task in loaded["tasks"].items()} == {
        item.name: len(item.prompts) for item in large.values()
    }
