"""A worker: one model resident on one device, rewritten in place and scored for each candidate.

A parameter-space candidate is merged into the model's weights (``InPlaceMerger``); a data-flow
candidate re-routes a model through the resident sources' layers (``DataFlowRouter``).

Workers hold no search logic. The serial executor runs one in-process; the Ray executor runs one per
GPU (or CPU slot) as an actor. Both build it from the same ``WorkerSpec``.
"""

from __future__ import annotations

import math
import os
import socket
import time
import traceback
from dataclasses import dataclass

import torch

from evomerge.dtypes import torch_dtype
from evomerge.errors import EvomergeError
from evomerge.evaluate.lm_eval_scorer import ItemSubset, LMEvalScorer, TaskSet
from evomerge.evaluate.request_lengths import request_lengths
from evomerge.executor.memory import plan_memory
from evomerge.executor.placement import device_map
from evomerge.executor.reserve import requests_reserve
from evomerge.io.checkpoint import Checkpoint
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
    tier: str = "auto"  # where the sources are kept: auto (the fastest that fits), resident, host or disk
    gpus_per_worker: int = 1  # devices one worker's model spans (executor/placement.py)
    reserve_bytes: int | None = None  # headroom for the KV cache and activations; None: from the tasks' requests
    host_bytes: int | None = None  # host memory this worker may take (its share of its node's); None: all available


@dataclass(frozen=True)
class Outcome:
    metrics: dict[str, float] | None
    error: str | None
    seconds: float
    # Racing only: the raced metric's value on each item scored, in racing order, and how many items there are.
    item_values: list[float] | None = None
    items_total: int | None = None
    worker: str | None = None  # ``host:pid`` of the worker that scored it (Worker.name)


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


def _devices(device: torch.device, count: int) -> list[str]:
    """The devices one worker spans: ``count`` GPUs from the one named (cuda:1 with 2: cuda:1 and cuda:2;
    inside a Ray actor its own GPUs, numbered from cuda:0), or the same CPU N times, where the placement
    code path runs without moving anything."""
    if count < 1:
        raise EvomergeError(f"executor.gpus_per_worker={count}", "use 1 or more")
    if device.type != "cuda":
        return [str(device)] * count
    first = device.index or 0
    if first + count > torch.cuda.device_count():
        raise EvomergeError(
            f"device={device} with executor.gpus_per_worker={count} needs cuda:{first} to cuda:{first + count - 1}, "
            f"but this machine has {torch.cuda.device_count()} GPU(s)",
            "name a lower first device, or lower executor.gpus_per_worker",
        )
    return [f"cuda:{first + i}" for i in range(count)]


def reference_folder(template: Recipe | DataFlowRecipe):
    """The folder of the model a worker loads (a hub ID's cached snapshot): the recipe's base, else its first
    model; a data-flow recipe's embedding source."""
    if isinstance(template, DataFlowRecipe):
        return resolve_model(template.sources[template.embedding_source]).path
    return resolve_model(template.base if template.base is not None else template.models[0].model).path


def scoring_reserve(spec: WorkerSpec, folder) -> int | dict[str, int]:
    """``spec.reserve_bytes``, or the parts of one batch of the longest requests ``spec.tasks`` send, tokenized
    by the reference model's tokenizer in ``folder`` (a length unknown: full-length requests)."""
    if spec.reserve_bytes is not None:
        return spec.reserve_bytes
    from transformers import AutoTokenizer

    config = Checkpoint.open(folder).config  # a folder that is not a model is refused here, in a sentence
    lengths = request_lengths(spec.tasks, AutoTokenizer.from_pretrained(folder))
    return requests_reserve(
        config,
        dtype=spec.dtype,
        batch_size=spec.tasks.batch_size,
        max_length=spec.tasks.model_args.get("max_length"),
        scored=lengths.scored,
        generated=lengths.generated,
    )


def load_placed(folder: str, devices: list[str], *, dtype: str) -> torch.nn.Module:
    """The model in ``folder``, in ``dtype``, on ``devices``: one device, or layers across several
    (``device_map``: executor.gpus_per_worker)."""
    from transformers import AutoModelForCausalLM

    torch_type = torch_dtype(dtype)
    if len(devices) > 1:
        placed = device_map(Checkpoint.open(folder), devices, itemsize=torch_type.itemsize)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch_type, device_map=placed).eval()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch_type).to(devices[0]).eval()


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        from transformers import AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # one model load; its bar would bury the search's

        template = spec.template
        device = resolve_device(spec.device)
        devices = _devices(device, spec.gpus_per_worker)
        if len(devices) > 1 and isinstance(template, DataFlowRecipe):
            raise EvomergeError(
                f"executor.gpus_per_worker={spec.gpus_per_worker} places a parameter-space worker's model; a "
                "data-flow worker runs its sources' own layers on one device",
                "use executor.gpus_per_worker=1 with genome=dfs or ps_dfs",
            )
        folder = reference_folder(template)
        self.memory = plan_memory(
            template,
            device=device,
            devices=devices,
            dtype=spec.dtype,
            reserve=scoring_reserve(spec, folder),
            tier=spec.tier,
            reserve_required=spec.reserve_bytes is not None,
            host_free=spec.host_bytes,
        )
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        # Also in the run folder's workers.jsonl (the executor hands it on), for `evomerge status`.
        self.started = {"worker": self.name, "time": time.time(), "memory": self.memory.describe(device)}
        print(f"evomerge: {self.started['memory']}", flush=True)
        if isinstance(template, DataFlowRecipe):
            self.merger = DataFlowRouter.load(template, device=device, dtype=torch_dtype(spec.dtype))
            tokenizer = AutoTokenizer.from_pretrained(folder)
        else:
            model = load_placed(folder, devices, dtype=spec.dtype)
            self.merger = InPlaceMerger(
                model=model, template=template, tier=self.memory.tier, precompute=self.memory.precompute
            )
            # A tokenizer_source gives the merge its own vocabulary, which the model was resized to.
            tokenizer = self.merger.tokenizer
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(folder)
        self.scorer = LMEvalScorer(model=self.merger.model, tokenizer=tokenizer, tasks=spec.tasks)
        self.devices, self.dtype, self.tasks = devices, spec.dtype, spec.tasks

    def score_model(self, ref: str, subset: ItemSubset) -> list[float]:
        """Model ``ref``'s values on ``subset``'s items, loaded from its own folder (with its own tokenizer)
        and placed as this worker places its model: the estimate's endpoints, scored where the candidates
        are (a 70B endpoint spans the worker's GPUs; a driver without a GPU scores nothing). The model is
        a copy beside the worker's sources for the time it is scored, then freed."""
        from transformers import AutoTokenizer

        folder = resolve_model(ref).path
        model = load_placed(folder, self.devices, dtype=self.dtype)
        scorer = LMEvalScorer(model=model, tokenizer=AutoTokenizer.from_pretrained(folder), tasks=self.tasks)
        values, _ = scorer.score_items(subset)
        del scorer, model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next candidate's activations get the endpoint's memory back
        return values

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
                    worker=self.name,
                )
            metrics = self.scorer.score()
        except Exception as error:  # noqa: BLE001 - a bad candidate (e.g. della's density±epsilon
            # outside (0, 1)) must not end the search: it is logged and scored as the worst.
            if _is_device_failure(error):
                raise DeviceFailure(_described(error, frames=0)) from error
            return Outcome(metrics=None, error=_described(error), seconds=time.perf_counter() - start, worker=self.name)
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        error = f"non-finite metric(s): {', '.join(bad)}" if bad else None
        return Outcome(metrics=metrics, error=error, seconds=time.perf_counter() - start, worker=self.name)
