"""The chance baseline every toy-task score is compared with: answer with the last operand."""

from __future__ import annotations

import json
from pathlib import Path

from evomerge.toy.language import NUMBER_WORDS, TWINS


def task_items(tasks_dir: Path, task_name: str) -> list[dict[str, str]]:
    with open(tasks_dir / task_name / "test.jsonl") as handle:
        return [json.loads(line) for line in handle]


def last_operand_accuracy(tasks_dir: Path, task_name: str) -> float:
    """How often "the answer is the number word just before 'is'" is right: the chance heuristic that
    every L2 figure must beat (TOYWORLD.md measured ~7% for it)."""
    to_l1 = {l2: l1 for l1, l2 in TWINS}
    items = task_items(tasks_dir, task_name)
    hits = 0
    for item in items:
        word = item["prompt"].split()[-2]
        word = to_l1.get(word, word)
        hits += word in NUMBER_WORDS and str(NUMBER_WORDS.index(word)) == item["answer"]
    return hits / len(items)
