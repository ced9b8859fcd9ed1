"""Score the model a worker holds with lm-eval, without reloading anything between candidates.

``HFLM`` wraps the already-loaded model once; the merger overwrites its weights in place, and every
``score()`` call sees the new weights. Tasks are built once (datasets read once); a fixed random
subsample per task keeps candidates comparable. Bootstrap stderr is off: it costs more than the
evaluation on small tasks and the search never reads it.

The options users pass to ``lm_eval`` (chat template, few-shot as multi-turn, system instruction,
generation kwargs, ``batch_size=auto``, unsafe code, extra ``HFLM`` arguments, few-shot counts per task)
are ``TaskSet`` fields with lm-eval's names, so a run's config records them and export scores with them.
Groups (``mmlu``, ``bbh``, ``leaderboard_*``) report their aggregate and every subtask's metrics.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from evomerge.errors import EvomergeError

# Benchmarks whose test split is the yardstick everyone reports: optimizing on it games the number.
WELL_KNOWN = (
    "mmlu", "gsm8k", "mgsm", "arc_", "hellaswag", "winogrande", "truthfulqa", "piqa", "boolq",
    "humaneval", "mbpp", "bbh", "gpqa", "math", "ifeval", "jcommonsenseqa", "jnli", "jsquad", "xwinograd",
)  # fmt: skip
# Suites that republish those benchmarks under their own prefix (lm-eval's ja_leaderboard_mgsm is MGSM-JA's
# test split, leaderboard_bbh is BBH's).
SUITE_PREFIXES = ("ja_leaderboard_", "leaderboard_", "openllm_")


def is_well_known(name: str) -> bool:
    """Whether ``name`` is one of the benchmarks everyone reports, under its own name or a suite's prefix."""
    name = name.lower()
    for prefix in SUITE_PREFIXES:
        name = name.removeprefix(prefix)
    return name.startswith(WELL_KNOWN)


@dataclass(frozen=True)
class TaskSet:
    names: tuple[str, ...]
    include_path: str | None = None
    limit: int | None = None
    sample_seed: int = 0
    num_fewshot: int | Mapping[str, int] | None = None  # one count for every task, or per task name
    batch_size: int | str = 32  # or "auto": lm-eval finds the largest that fits, once per worker
    acknowledge_test_split: bool = False
    apply_chat_template: bool | str = False  # True: the tokenizer's template; a string: that named template
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = None
    gen_kwargs: Mapping[str, Any] = field(default_factory=dict)  # for generate_until tasks, e.g. max_gen_toks
    confirm_run_unsafe_code: bool = False
    model_args: Mapping[str, Any] = field(default_factory=dict)  # more HFLM arguments, e.g. max_length


class LMEvalScorer:
    def __init__(self, *, model: torch.nn.Module, tokenizer, tasks: TaskSet) -> None:
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        self._evaluate = evaluate
        self.tasks = tasks
        with _quiet():
            self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=tasks.batch_size, **tasks.model_args)
            manager = _task_manager(TaskManager, tasks)
        unknown = [name for name in tasks.names if not manager.match_tasks([name])]
        if unknown:
            raise EvomergeError(
                f"lm-eval knows no task named '{unknown[0]}'"
                + (f" (include path '{tasks.include_path}')" if tasks.include_path else ""),
                "check the name with `lm_eval --tasks list`, or point tasks.include_path at your task folder",
            )
        with _quiet():
            # {"tasks": every leaf task by name, "groups": ..., "group_map": ...}: groups hold their subtasks.
            self.loaded = manager.load(list(tasks.names))
        leaves = self.loaded["tasks"]
        for name, task in leaves.items():
            fewshot = _fewshot_for(tasks.num_fewshot, name, self.loaded.get("group_map", {}))
            if fewshot is not None:
                task.set_config(key="num_fewshot", value=fewshot)
            if tasks.gen_kwargs and task.get_config("output_type") == "generate_until":
                task.set_config(key="generation_kwargs", value=dict(tasks.gen_kwargs), update=True)
            task.set_fewshot_seed(seed=tasks.sample_seed)
        _warn_on_test_splits(leaves, acknowledged=tasks.acknowledge_test_split)
        self.samples = _subsample(leaves, tasks.limit, tasks.sample_seed)

    def score(self) -> dict[str, float]:
        """Every metric of every task and group as ``"task/metric" → value`` (NaN where lm-eval gave NaN).

        A metric under a named filter keeps it, as lm-eval prints it: gsm8k's two answers are
        ``gsm8k/exact_match,strict-match`` and ``gsm8k/exact_match,flexible-extract``. Under lm-eval's
        default filter ("none") the name is just ``task/metric``.
        """
        tasks = self.tasks
        with _quiet():
            results = self._evaluate(
                lm=self.lm,
                task_dict=self.loaded,
                samples=self.samples,
                bootstrap_iters=0,
                log_samples=False,
                verbosity="ERROR",
                system_instruction=tasks.system_instruction,
                apply_chat_template=tasks.apply_chat_template,
                fewshot_as_multiturn=tasks.fewshot_as_multiturn,
                confirm_run_unsafe_code=tasks.confirm_run_unsafe_code,
            )
        metrics = {}
        for task, values in results["results"].items():
            for key, value in values.items():
                metric, _, filter_name = key.partition(",")
                if metric.endswith("_stderr") or metric == "sample_len" or not isinstance(value, (int, float)):
                    continue
                name = metric if filter_name in ("", "none") else f"{metric},{filter_name}"
                metrics[f"{task}/{name}"] = float(value)
        return metrics

    def score_items(self, subset: ItemSubset) -> tuple[list[float], int]:
        """Per-item values of one leaf task's metric on positions ``start:stop`` (or ``positions``) of its
        items in racing order, and how many items that order holds (the ``limit`` subsample, or every item).

        Racing order is one fixed shuffle (``sample_seed``), so every candidate sees the same items in the
        same order, and any prefix is a uniform sample of the task; a race permutes it again for each
        generation (``ItemSubset.shuffle``).
        """
        task_name, metric, filter_name = _split_metric(subset.metric)
        task = self.loaded["tasks"].get(task_name)
        if task is None:
            raise EvomergeError(
                f"the raced objective term '{subset.metric}' names task '{task_name}', not a leaf task of this run",
                f"race a metric of one of: {', '.join(sorted(self.loaded['tasks']))}",
            )
        order = self._racing_order(task_name, task)
        indices = [order[position] for position in subset.positions_in(len(order))]
        if not indices:
            return [], len(order)  # lm-eval reads an empty selection as "every item"
        tasks = self.tasks
        with _quiet():
            results = self._evaluate(
                lm=self.lm,
                task_dict={"tasks": {task_name: task}, "groups": {}},
                # Sorted: lm-eval visits the selected items in dataset order and labels the k-th with the
                # k-th index it was given (lm_eval 0.4 evaluator), so an unsorted list mislabels them.
                samples={task_name: sorted(indices)},
                bootstrap_iters=0,
                log_samples=True,  # per-item results come only with the logged samples
                verbosity="ERROR",
                system_instruction=tasks.system_instruction,
                apply_chat_template=tasks.apply_chat_template,
                fewshot_as_multiturn=tasks.fewshot_as_multiturn,
                confirm_run_unsafe_code=tasks.confirm_run_unsafe_code,
            )
        samples = results["samples"][task_name]
        by_doc = {
            sample["doc_id"]: sample[metric]
            for sample in samples
            if sample["filter"] == filter_name and metric in sample
        }
        if len(by_doc) != len(indices):
            per_item = sorted(
                {
                    f"{task_name}/{name}" + ("" if sample["filter"] == "none" else f",{sample['filter']}")
                    for sample in samples
                    for name in sample["metrics"]
                }
            )
            raise EvomergeError(
                f"the raced objective term '{subset.metric}' has no per-item value in lm-eval's samples",
                f"race one of the metrics lm-eval computes per item: {', '.join(per_item)}",
            )
        return [float(by_doc[i]) for i in indices], len(order)

    def _racing_order(self, task_name: str, task) -> list[int]:
        items = self.samples[task_name] if self.samples is not None else list(range(len(task.eval_docs)))
        rng = np.random.default_rng([self.tasks.sample_seed, zlib.crc32(task_name.encode()), 1])
        return [items[i] for i in rng.permutation(len(items))]


@dataclass(frozen=True)
class ItemSubset:
    """Items ``start:stop`` of ``metric``'s task in racing order, or the items at ``positions`` of that
    order (estimated fitness: the anchors); ``metric`` as the objectives name it. With ``shuffle`` (a race's
    (seed, generation)), positions count in racing order permuted by ``numpy.random.default_rng(shuffle)``."""

    metric: str
    start: int = 0
    stop: int | None = None
    positions: tuple[int, ...] | None = None
    shuffle: tuple[int, ...] | None = None

    def positions_in(self, total: int) -> list[int]:
        """The positions in racing order, of a task of ``total`` items, that this subset selects."""
        order = range(total) if self.shuffle is None else np.random.default_rng(self.shuffle).permutation(total)
        if self.positions is None:
            return [int(position) for position in order[self.start : self.stop]]
        return [int(order[position]) for position in self.positions]


def _split_metric(name: str) -> tuple[str, str, str]:
    """``task/metric[,filter]`` as (task, metric, filter), lm-eval's default filter being "none"."""
    task, _, metric = name.rpartition("/")
    metric, _, filter_name = metric.partition(",")
    return task, metric, filter_name or "none"


def _fewshot_for(num_fewshot: int | Mapping[str, int] | None, task: str, group_map: dict) -> int | None:
    """The few-shot count for ``task``: the one count, its own entry, or its group's entry (nearest first)."""
    if num_fewshot is None or isinstance(num_fewshot, int):
        return num_fewshot
    if task in num_fewshot:
        return num_fewshot[task]
    parents = [group for group, children in group_map.items() if task in children]
    while parents:
        group = parents.pop(0)
        if group in num_fewshot:
            return num_fewshot[group]
        parents += [parent for parent, children in group_map.items() if group in children]
    return None


def _task_manager(task_manager_class, tasks: TaskSet):
    """Index only the user's folder when it holds every task: indexing lm-eval's own thousands of task
    YAMLs costs ~12 s per worker start, and user tasks usually live in their own folder."""
    if tasks.include_path is not None:
        local = task_manager_class(include_path=tasks.include_path, include_defaults=False)
        if all(local.match_tasks([name]) for name in tasks.names):
            return local
    return task_manager_class(include_path=tasks.include_path)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence lm-eval's and datasets' per-call logs and progress bars (they would bury the search's own
    progress bar); exceptions still propagate."""
    for name in ("lm-eval", "lm_eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def weighted_sum(metrics: dict[str, float], terms: dict[str, float]) -> float:
    """One objective from several metrics; NaN if any term is NaN (the caller scores that as worst)."""
    missing = [key for key in terms if key not in metrics]
    if missing:
        raise EvomergeError(
            f"objective term '{missing[0]}' is not among the metrics lm-eval returned",
            f"use one of: {', '.join(sorted(metrics))}",
        )
    total = sum(weight * metrics[key] for key, weight in terms.items())
    return total if math.isfinite(total) else math.nan


def _subsample(task_dict: dict, limit: int | None, seed: int) -> dict[str, list[int]] | None:
    if limit is None:
        return None
    samples = {}
    for name, task in task_dict.items():
        count = len(task.eval_docs)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        samples[name] = sorted(rng.choice(count, size=min(limit, count), replace=False).tolist())
    return samples


def _warn_on_test_splits(task_dict: dict, *, acknowledged: bool) -> None:
    for name, task in task_dict.items():
        if task.has_test_docs() and is_well_known(name) and not acknowledged:
            warnings.warn(
                f"\n\n*** evomerge: task '{name}' is scored on the TEST split of a well-known benchmark. "
                "Searching on it fits the merge to that test set, and the number you get no longer "
                "measures generalization. Use a validation split or a held-out task for the search, and "
                "report the test score only once at the end. Set tasks.acknowledge_test_split=true to "
                "silence this. ***\n",
                stacklevel=2,
            )
