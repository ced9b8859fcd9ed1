"""Memory counted per node: the Ray workers on one node share its RAM, so a pool is sized before any loads.

Each worker's own check reads what the OS reports available, which every worker on a node sees whole: eight
workers would each plan for all of it, and the node would run out of memory instead of the check refusing.
The driver therefore sizes the pool from each node's memory as Ray reports it (its ``memory`` resource):

- on CPUs (``device=cpu``), where host memory is the workers' device, each worker needs its plan in full
  (the fastest tier that fits a node). Ray reserves that much per worker (its ``memory`` resource), so it
  never packs more onto a node than it holds; an unset ``executor.num_workers`` becomes what the nodes hold
  (not one worker per CPU, each loading every source), and a set one that does not fit is refused;
- on GPUs, each worker has GPUs of its own, and takes an equal share of its node's RAM for what it keeps in
  host memory (the host tier's sources): the share is what its plan is checked against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from evomerge.errors import EvomergeError
from evomerge.executor.memory import plan_memory
from evomerge.executor.worker import WorkerSpec, reference_folder, scoring_reserve


def size_pool(
    spec: WorkerSpec,
    count: int,
    *,
    explicit: bool,
    nodes: Sequence[dict[str, float]],
    threads: int,
    resources: dict[str, float] | None = None,
) -> tuple[int, WorkerSpec, int | None]:
    """``(workers, spec, bytes Ray reserves per worker or None)`` for a pool of ``count`` workers (``explicit``:
    the user set executor.num_workers) on ``nodes``, each node's Ray resources (CPU, GPU, memory, custom),
    each worker taking ``threads`` CPUs and ``resources`` (executor.resources) besides."""

    def slots(node: dict[str, float]) -> int:
        """Workers the node can place, memory aside."""
        by_device = int(node.get("GPU", 0)) // spec.gpus_per_worker if on_gpu else int(node.get("CPU", 0)) // threads
        return min([by_device, *(int(node.get(name, 0) // amount) for name, amount in (resources or {}).items())])

    on_gpu = torch.device(spec.device).type == "cuda"
    if on_gpu:
        shares = [int(node.get("memory", 0)) // workers for node in nodes if (workers := min(count, slots(node))) > 0]
        return count, replace(spec, host_bytes=min(shares)) if shares else spec, None
    largest = max(int(node.get("memory", 0)) for node in nodes)
    plan = plan_memory(
        spec.template,
        device=torch.device("cpu"),
        dtype=spec.dtype,
        reserve=scoring_reserve(spec, reference_folder(spec.template)),
        tier=spec.tier,
        reserve_required=spec.reserve_bytes is not None,
        host_free=largest,
    )
    need = sum(plan.device_parts.values()) + sum(plan.host_parts.values())
    held = [min(slots(node), int(node.get("memory", 0)) // need) for node in nodes]
    fit = sum(held)
    if fit == 0 or (explicit and count > fit):
        per_node = ", ".join(
            f"{node.get('memory', 0) / 2**30:.1f} GiB and {slots(node)} slot(s) hold {k}"
            for node, k in zip(nodes, held, strict=True)
        )
        raise EvomergeError(
            f"{count} worker(s) on device=cpu each need {need / 2**30:.2f} GiB of their node's memory "
            f"({plan.describe('cpu')}), and the nodes hold {fit} ({per_node})",
            (
                f"use executor.num_workers={fit}, or leave it unset (the pool then takes what memory holds); or "
                if fit
                else ""
            )
            + "use dtype=bfloat16, merge fewer models, or add memory or nodes",
        )
    if count > fit:
        print(
            f"evomerge: {fit} worker(s), not {count}: each needs {need / 2**30:.2f} GiB of its node's memory "
            "(set executor.num_workers to choose)",
            flush=True,
        )
    return min(count, fit), replace(spec, host_bytes=need), need
