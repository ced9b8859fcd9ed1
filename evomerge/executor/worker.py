"""A worker: one model resident on one device, rewritten in place and scored for each candidate.

A parameter-space candidate is merged into the model's weights (``InPlaceMerger``); a data-flow
candidate re-routes a model through the resident sources' layers (``DataFlowRouter``).

Workers hold no search logic. The serial executor runs one in-process; the Ray executor runs one per
GPU (or CPU slot) as an actor. Both build it from the same ``WorkerSpec``.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass

import torch

from evomerge.dtypes import torch_dtype
from evomerge.evaluate.lm_eval_scorer import ItemSubset, LMEvalScorer, TaskSet
from evomerge.executor.memory import check_sources_fit
from evomerge.io.locate import resolve_model
from evomerge.materialize.dataflow import DataFlowRouter
from evomerge.materialize.in_place import InPlaceMerger
from evomerge.materialize.to_disk import resolve_device
from evomerge.recipe.dataflow import DataFlowRecipe
from evomerge.recipe.recipe import Recipe


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to start: plain data, cheap to send to another process."""

    template: Recipe | DataFlowRecipe
    tasks: TaskSet
    device: str = "cpu"
    dtype: str = "float32"


@dataclass(frozen=True)
class Outcome:
    metrics: dict[str, float] | None
    error: str | None
    seconds: float
    # Racing only: the raced metric's value on each item scored, in racing order, and how many items there are.
    item_values: list[float] | None = None
    items_total: int | None = None


class DeviceFailure(Exception):
    """The device failed under a candidate: out of memory, or a CUDA error (which leaves the process's
    CUDA context unusable). The candidate is not yet to blame, and this process may be: the Ray pool
    restarts the worker's process and runs the candidate again (up to ``executor.max_tries``); the
    serial executor stops the search, which a resume continues in a fresh process."""


def _is_device_failure(error: Exception) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, torch.AcceleratorError)):
        return True
    return isinstance(error, RuntimeError) and "CUDA error" in str(error)  # raised as a plain RuntimeError by some ops


def _described(error: Exception, *, frames: int = 3) -> str:
    """``Type: message`` on the first line (what the log and fail-fast compare), then the last ``frames``
    frames of the traceback, innermost last, so a failure can be traced from the log alone."""
    detail = "".join(traceback.format_exception_only(type(error), error)).strip()
    if not frames:
        return detail
    stack = traceback.extract_tb(error.__traceback__)[-frames:]
    return "\n".join([detail, *(f"  at {f.filename}:{f.lineno} in {f.name}" for f in stack)])


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # one model load; its bar would bury the search's

        template = spec.template
        device = resolve_device(spec.device)
        check_sources_fit(template, device=device, dtype=spec.dtype)
        if isinstance(template, DataFlowRecipe):
            self.merger = DataFlowRouter.load(template, device=device, dtype=torch_dtype(spec.dtype))
            tokenizer = AutoTokenizer.from_pretrained(resolve_model(template.sources[template.embedding_source]).path)
        else:
            reference = template.base if template.base is not None else template.models[0].model
            folder = resolve_model(reference).path  # a hub ID's cached snapshot
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(spec.dtype)).to(device).eval()
            self.merger = InPlaceMerger(model=model, template=template)
            # A tokenizer_source gives the merge its own vocabulary, which the model was resized to.
            tokenizer = self.merger.tokenizer
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(folder)
        self.scorer = LMEvalScorer(model=self.merger.model, tokenizer=tokenizer, tasks=spec.tasks)

    def evaluate(self, recipe: Recipe | DataFlowRecipe, subset: ItemSubset | None = None) -> Outcome:
        """Materialize and score one candidate (on every metric, or on ``subset``'s items of the raced
        metric); a failure of the candidate becomes an Outcome, one of the device a ``DeviceFailure``."""
        start = time.perf_counter()
        try:
            self.merger.materialize(recipe)
            if subset is not None:
                values, total = self.scorer.score_items(subset)
                return Outcome(
                    metrics=None,
                    error=None,
                    seconds=time.perf_counter() - start,
                    item_values=values,
                    items_total=total,
                )
            metrics = self.scorer.score()
        except Exception as error:  # noqa: BLE001 - a bad candidate (e.g. della's density±epsilon
            # outside (0, 1)) must not end the search: it is logged and scored as the worst.
            if _is_device_failure(error):
                raise DeviceFailure(_described(error, frames=0)) from error
            return Outcome(metrics=None, error=_described(error), seconds=time.perf_counter() - start)
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        error = f"non-finite metric(s): {', '.join(bad)}" if bad else None
        return Outcome(metrics=metrics, error=error, seconds=time.perf_counter() - start)
