"""Write the toy world's evaluation sets as lm-eval task folders (YAML + local JSONL).

Each item is scored as one ``loglikelihood`` request whose ``acc`` is lm-eval's ``is_greedy``: the
answer numeral is a single token, so "greedy decoding gives the answer" costs one forward pass per
item, where ``multiple_choice`` over 21 numerals would cost 21.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class TaskItems:
    """One task's items: prompts without the trailing space, answers as numeral strings."""

    name: str
    description: str
    prompts: list[str]
    answers: list[str]


def write_task(item_set: TaskItems, tasks_dir: Path, final_tasks_dir: Path) -> None:
    """Write ``<tasks_dir>/<name>/{<name>.yaml, test.jsonl}``.

    The YAML names its data by absolute path under ``final_tasks_dir``, where the folder will be after the
    atomic rename: lm-eval hands ``data_files`` to ``datasets.load_dataset``, which resolves relative paths
    against the working directory, not the YAML.
    """
    folder = tasks_dir / item_set.name
    folder.mkdir(parents=True)
    with open(folder / "test.jsonl", "w") as handle:
        for prompt, answer in zip(item_set.prompts, item_set.answers, strict=True):
            # "target" carries the leading space: a loglikelihood request scores the target as the literal
            # continuation (no target_delimiter), and the word-level tokenizer splits on that space.
            record = {"prompt": prompt, "answer": answer, "target": f" {answer}"}
            handle.write(json.dumps(record) + "\n")
    config = {
        "task": item_set.name,
        "tag": ["toy"],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(final_tasks_dir / item_set.name / "test.jsonl")}},
        "test_split": "test",
        "output_type": "loglikelihood",
        # Field names, not Jinja templates: lm-eval compiles a template once per item (~0.9 s of a 2 s call).
        "doc_to_text": "prompt",
        "doc_to_target": "target",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "description": item_set.description},
    }
    with open(folder / f"{item_set.name}.yaml", "w") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)


def chance_accuracy(test_jsonl: Path) -> float:
    """Chance for a task: always answering its most common answer."""
    answers = [json.loads(line)["answer"] for line in test_jsonl.read_text().splitlines()]
    return Counter(answers).most_common(1)[0][1] / len(answers)


def write_missing_tasks(item_sets: list[TaskItems], tasks_dir: Path) -> None:
    """Write each task folder that ``tasks_dir`` lacks, for tasks added to a world after it was built.

    Each folder is written beside the world's folder and renamed into ``tasks_dir`` whole: lm-eval indexes
    every YAML under its include path, so a half-written folder there would be read by a search that starts
    meanwhile. Two processes adding the same task both write it; the second rename fails and its copy goes.
    """
    for item_set in item_sets:
        final = tasks_dir / item_set.name
        if final.exists():
            continue
        staging = tasks_dir.parent / f".{item_set.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            write_task(item_set, staging, tasks_dir)
            try:
                (staging / item_set.name).rename(final)
            except OSError:
                if not final.exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
