"""Score the model a worker holds with lm-eval, without reloading anything between candidates.

``HFLM`` wraps the already-loaded model once; the merger overwrites its weights in place, and every
``score()`` call sees the new weights. Tasks are built once (datasets read once); a fixed random
subsample per task keeps candidates comparable. Bootstrap stderr is off: it costs more than the
evaluation on small tasks and the search never reads it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

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
    num_fewshot: int | None = None
    batch_size: int = 32
    acknowledge_test_split: bool = False


class LMEvalScorer:
    def __init__(self, *, model: torch.nn.Module, tokenizer, tasks: TaskSet) -> None:
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager, get_task_dict

        self._evaluate = evaluate
        self.tasks = tasks
        with _quiet():
            self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=tasks.batch_size)
            manager = _task_manager(TaskManager, tasks)
        unknown = [name for name in tasks.names if not manager.match_tasks([name])]
        if unknown:
            raise EvomergeError(
                f"lm-eval knows no task named '{unknown[0]}'"
                + (f" (include path '{tasks.include_path}')" if tasks.include_path else ""),
                "check the name with `lm_eval --tasks list`, or point tasks.include_path at your task folder",
            )
        with _quiet():
            self.task_dict = get_task_dict(list(tasks.names), manager)
        for task in self.task_dict.values():
            if tasks.num_fewshot is not None:
                task.set_config(key="num_fewshot", value=tasks.num_fewshot)
            task.set_fewshot_seed(seed=tasks.sample_seed)
        _warn_on_test_splits(self.task_dict, acknowledged=tasks.acknowledge_test_split)
        self.samples = _subsample(self.task_dict, tasks.limit, tasks.sample_seed)

    def score(self) -> dict[str, float]:
        """Every metric of every task as ``"task/metric" → value`` (NaN where lm-eval gave NaN)."""
        with _quiet():
            results = self._evaluate(
                lm=self.lm,
                task_dict=self.task_dict,
                samples=self.samples,
                bootstrap_iters=0,
                log_samples=False,
                verbosity="ERROR",
            )
        metrics = {}
        for task, values in results["results"].items():
            for key, value in values.items():
                metric, _, _filter = key.partition(",")
                if metric.endswith("_stderr") or metric == "sample_len" or not isinstance(value, (int, float)):
                    continue
                metrics[f"{task}/{metric}"] = float(value)
        return metrics


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
