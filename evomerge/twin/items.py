"""The router's training and test items: (task, context, continuation) read from lm-eval task configs.

The one place evomerge.twin touches lm-eval's task objects (``get_config``, ``build_all_requests``,
``instances``); tests/test_twin.py reads the toy tasks through it, so a
release that changes them fails there loudly."""

from __future__ import annotations

from dataclasses import dataclass

from evomerge.errors import EvomergeError


@dataclass(frozen=True)
class TaskItem:
    task: str
    context: str
    continuation: str


def task_items(names: list[str], *, include_path: str | None) -> list[TaskItem]:
    """Every evaluated document of the named loglikelihood tasks, as lm-eval builds its request."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=include_path is None)
    leaves = manager.load(list(names))["tasks"]
    items = []
    for name, task in leaves.items():
        kind = task.get_config("output_type")
        if kind != "loglikelihood":
            raise EvomergeError(
                f"task '{name}' is a {kind} task; the Twin router learns from loglikelihood tasks' targets",
                "train the router on loglikelihood tasks (the run's own tasks, or --tasks NAMES)",
            )
        # lm-eval's own requests, not doc_to_text + target_delimiter + doc_to_target: a loglikelihood request
        # has no delimiter (lm-eval 0.4.13), and with one a BPE tokenizer reads "  five" as two other tokens.
        task.build_all_requests()
        items += [TaskItem(name, *instance.arguments) for instance in task.instances]
    return items
