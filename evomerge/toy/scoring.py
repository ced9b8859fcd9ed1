"""Score models on the toy tasks with lm-eval, offline, and the chance baseline they are compared with."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evomerge.toy.language import NUMBER_WORDS, TWINS


class LmEvalScorer:
    """lm-eval on models already in memory, with the tasks loaded once for every call.

    It calls ``lm_eval.evaluator.evaluate`` rather than ``simple_evaluate``, which would reload the
    tasks' data and, on every call, collect environment info by running subprocesses (~0.8 s measured,
    more than scoring the items). ``include_defaults=False`` keeps TaskManager from indexing lm-eval's
    thousands of built-in task YAMLs; ``bootstrap_iters=0`` and ``log_samples=False`` skip the
    standard-error bootstrap and the per-item log.
    """

    def __init__(self, tasks_dir: Path, batch_size: int = 256, threads: int = 1) -> None:
        # Local JSON data and a model in memory: nothing to download, so say so before datasets is imported.
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from lm_eval.tasks import TaskManager

        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        self.task_manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
        self.batch_size = batch_size
        # One thread: a forward pass of this size took 0.14-0.21 s on one thread and 0.66-0.78 s on two
        # on a shared 2-core machine.
        self.threads = threads
        self._loaded: dict[tuple[str, ...], dict] = {}

    def accuracy(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task_names: list[str]
    ) -> dict[str, float]:
        """lm-eval's ``acc`` (the greedy next token is the answer numeral) on each task."""
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM

        key = tuple(task_names)
        if key not in self._loaded:
            self._loaded[key] = self.task_manager.load(task_names)
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            results = evaluate(
                lm=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, device="cpu"),
                task_dict=self._loaded[key],
                bootstrap_iters=0,
                log_samples=False,
                verbosity="ERROR",
            )
        finally:
            torch.set_num_threads(threads)
        return {name: results["results"][name]["acc,none"] for name in task_names}


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
