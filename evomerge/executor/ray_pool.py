"""Score candidates on a pool of Ray actors: one per GPU, or one per ``threads`` CPUs without a GPU (and,
with ``executor.resources``, only where each worker's custom Ray resources are free).

Each actor builds one ``Worker`` from the same ``WorkerSpec`` as the serial executor, reading the
sources from their (shared) paths itself: only recipes and scores cross Ray's object store. The
driver hands each queued candidate to the next free actor and yields outcomes as they complete; the
search loop puts the rows back in proposal order, so the pool's results equal the serial executor's.

While more candidates wait than there are actors, each busy actor also holds one candidate queued
behind its running one (Ray runs an actor's calls in order), so it starts the next as soon as it
finishes instead of after a round trip to the driver. The last candidates of a batch go only to
actors that are free, so none waits behind a slow candidate while another actor has nothing to do.

An actor that dies mid-candidate (killed, or ended by its own ``DeviceFailure``: a CUDA error, out
of memory) is restarted by Ray and the candidate queued again; one that runs past ``timeout_s`` is
killed to the same effect. After ``max_tries`` such deaths the candidate comes back as a failed
Outcome, which the loop scores worst.
A candidate queued behind the one that died never ran: it is queued again without counting a try.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from evomerge.errors import EvomergeError
from evomerge.evaluate.lm_eval_scorer import ItemSubset
from evomerge.executor.memory import SourcesDoNotFit
from evomerge.executor.node_memory import size_pool
from evomerge.executor.worker import DeviceFailure, Outcome, Worker, WorkerSpec
from evomerge.recipe.recipe import Recipe


class WorkerActor:
    """A Worker in its own process. A startup EvomergeError is kept and reported by ``ready``, not
    raised: Ray would wrap it in a traceback, and the user needs its one paragraph."""

    def __init__(self, *, spec: WorkerSpec, threads: int) -> None:
        torch.set_num_threads(threads)
        self.worker: Worker | None = None
        self.startup_error: tuple[str, str] | None = None
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        try:
            self.worker = start_worker(spec, patience_s=RESTART_PATIENCE_S if restarted else 0.0)
        except EvomergeError as error:
            self.startup_error = (error.problem, error.fix)

    # Retried through restarts: it answers once the actor is back, which is when it can take work.
    @ray.method(max_task_retries=-1)
    def ready(self) -> tuple[int, str, tuple[str, str] | None, dict | None]:
        started = None if self.worker is None else self.worker.started
        return os.getpid(), ray.get_runtime_context().get_node_id(), self.startup_error, started

    def score_model(self, ref: str, subset: ItemSubset) -> list[float]:
        return self.worker.score_model(ref, subset)

    def evaluate(self, recipe: Recipe, subset: ItemSubset | None = None) -> Outcome:
        try:
            return self.worker.evaluate(recipe, subset)
        except DeviceFailure as failure:
            # Out of memory or a CUDA error: end this process, as a kill would. Ray restarts the actor
            # and the pool runs the candidate again, counting a try.
            print(
                f"evomerge worker {os.getpid()}: {failure}; exiting for Ray to restart it", file=sys.stderr, flush=True
            )
            os._exit(1)


# How long a restarted worker waits for its device's memory to come free before it reports the shortage.
RESTART_PATIENCE_S = 60.0


def start_worker(spec: WorkerSpec, *, patience_s: float) -> Worker:
    """``Worker(spec)``, retried for up to ``patience_s`` while the sources do not fit the device.

    A worker restarted after a kill (a timeout, a device failure) may find the memory of the process it
    replaces not yet given back (a process stuck in a CUDA kernel exits late); without the wait, that
    one moment would stop the whole search with a memory error."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return Worker(spec)
        except SourcesDoNotFit:
            if time.monotonic() >= deadline:
                raise
            time.sleep(1.0)


@dataclass
class _Job:
    """A candidate sent to an actor. ``started`` starts its timeout clock: None while it is queued
    behind another call, set when the driver sees that call finish (its actor then runs this one, so
    the clock starts late by the driver's reaction time, never early). ``timed_out`` once it was killed."""

    ref: ray.ObjectRef
    position: int
    started: float | None
    timed_out: bool = False


class RayExecutor:
    def __init__(
        self,
        *,
        spec: WorkerSpec,
        num_workers: int | None,
        address: str | None,
        threads: int,
        max_tries: int,
        timeout_s: float | None,
        on_worker: Callable[[dict], None] | None = None,
        resources: dict[str, float] | None = None,
    ) -> None:
        """``on_worker``: called with each worker's ``Worker.started`` as it starts, restarts included."""
        self.on_worker = on_worker
        self.owns_ray = _connect(address)
        self.max_tries = max_tries
        self.timeout_s = timeout_s
        on_gpu = torch.device(spec.device).type == "cuda"
        gpus = spec.gpus_per_worker if on_gpu else 0
        resources = resources or {}
        count = num_workers or _slots(on_gpu=on_gpu, threads=threads, gpus=gpus, resources=resources)
        _check_room(count, on_gpu=on_gpu, threads=threads, gpus=gpus, resources=resources)
        # Workers on one node share its memory: sized per node before any loads (executor/node_memory.py).
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        count, spec, memory = size_pool(
            spec, count, explicit=num_workers is not None, nodes=nodes, threads=threads, resources=resources
        )
        actor_class = ray.remote(WorkerActor).options(
            num_cpus=threads,
            num_gpus=gpus,
            memory=memory,
            resources=resources,  # custom per-node resources (executor.resources): which nodes may hold a worker
            max_restarts=-1,  # deaths are counted per candidate (max_tries), not per actor
            max_task_retries=0,  # a candidate that killed its worker is re-run by us, and counted
        )
        # Ray sets CUDA_VISIBLE_DEVICES per actor: its GPUs are cuda:0 .. cuda:N-1 inside it.
        actor_spec = replace(spec, device="cuda") if on_gpu else spec
        self.actors = [actor_class.remote(spec=actor_spec, threads=threads) for _ in range(count)]
        self.pids: dict[ray.actor.ActorHandle, int] = {}
        self.nodes: dict[ray.actor.ActorHandle, str] = {}  # the Ray node id each live worker runs on
        self._idle: deque = deque()
        self._restarting = {actor.ready.remote(): actor for actor in self.actors}
        try:
            while self._restarting:  # every worker up (or its startup error raised) before the first candidate
                self._await_restart(next(iter(self._restarting)))
        except BaseException:
            self.close()  # a worker that started would otherwise hold its CPU or GPU until Ray shuts down
            raise
        nodes = sorted(set(self.nodes.values()))
        print(f"evomerge: {count} Ray worker(s) on {len(nodes)} node(s): {', '.join(nodes)}", flush=True)

    def worker_pids(self) -> list[int]:
        """The process id of each live worker (to watch them, or kill one to test recovery)."""
        return [self.pids[actor] for actor in self.actors if actor in self.pids]

    def evaluate(self, recipes: list[Recipe], subset: ItemSubset | None = None) -> Iterator[tuple[int, Outcome]]:
        """Yield ``(position, outcome)`` as each candidate completes, every worker kept busy meanwhile.

        Candidates appended to ``recipes`` while this runs (before the generator is resumed) are scored
        too: the asynchronous search loop asks one for each result it tells."""
        queue: deque[int] = deque()
        tries: list[int] = []
        lines: dict[ray.actor.ActorHandle, deque[_Job]] = {}  # each busy actor's calls, the running one first
        while True:
            queue.extend(range(len(tries), len(recipes)))
            tries += [0] * (len(recipes) - len(tries))
            if not (queue or lines):
                return
            self._dispatch(queue, recipes, lines, subset)
            heads = {line[0].ref: actor for actor, line in lines.items()}
            ready, _ = ray.wait([*heads, *self._restarting], num_returns=1, timeout=self._wait_s(lines))
            if not ready:
                self._kill_overdue(lines)
                continue
            (ref,) = ready
            if ref in self._restarting:
                self._await_restart(ref)
                continue
            actor = heads[ref]
            job = lines[actor].popleft()
            outcome = self._collect(ref, job, actor)
            if outcome is None or job.timed_out:  # the actor is restarting
                # A call queued behind the one that died never ran: queue it again, without counting a try.
                queue.extendleft(reversed([queued.position for queued in lines.pop(actor)]))
            elif lines[actor]:
                lines[actor][0].started = time.monotonic()
            else:
                del lines[actor]
                self._idle.append(actor)
            if outcome is None:
                tries[job.position] += 1
                if tries[job.position] < self.max_tries:
                    queue.appendleft(job.position)  # re-run first: the loop logs rows in proposal order
                    continue
                outcome = Outcome(metrics=None, error=self._give_up(job), seconds=time.monotonic() - job.started)
            self._dispatch(queue, recipes, lines, subset)  # a freed actor works while the loop logs this row
            yield job.position, outcome

    def score_models(self, refs: list[str], subset: ItemSubset) -> Iterator[list[float]]:
        """Each model's values on ``subset``'s items, in the order of ``refs``: the models spread over
        the workers (one each, in turn), all scoring at once. Called before any candidate is sent."""
        calls = [self.actors[i % len(self.actors)].score_model.remote(ref, subset) for i, ref in enumerate(refs)]
        for ref, call in zip(refs, calls, strict=True):
            try:
                yield ray.get(call)
            except (RayActorError, RayTaskError) as error:
                last = [line.strip() for line in str(error).splitlines() if line.strip()][-1]
                raise EvomergeError(
                    f"a Ray worker failed while scoring '{ref}' on every item for the estimate: {last}",
                    "a path the node cannot read: give every node the models at the same paths; out of memory: the "
                    "worker's sources and the endpoint (a copy of the model, while it is scored) do not fit together, "
                    "so use executor.tier=host or disk, or more executor.gpus_per_worker; then start the run again",
                ) from None

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors, self._idle, self._restarting = [], deque(), {}
        if self.owns_ray:
            ray.shutdown()

    def _dispatch(
        self,
        queue: deque[int],
        recipes: list[Recipe],
        lines: dict[ray.actor.ActorHandle, deque[_Job]],
        subset: ItemSubset | None,
    ) -> None:
        while queue and self._idle:
            actor, position = self._idle.popleft(), queue.popleft()
            lines[actor] = deque([_Job(actor.evaluate.remote(recipes[position], subset), position, time.monotonic())])
        for actor, line in lines.items():
            # The last len(actors) candidates wait for actors that free up: an actor that drew slow
            # candidates then takes fewer of them, and the batch ends as balanced as without queueing.
            if len(queue) <= len(self.actors):
                return
            if len(line) == 1 and not line[0].timed_out:
                position = queue.popleft()
                line.append(_Job(actor.evaluate.remote(recipes[position], subset), position, None))

    def _collect(self, ref: ray.ObjectRef, job: _Job, actor: ray.actor.ActorHandle) -> Outcome | None:
        """The candidate's outcome, or None if its actor died (or was killed) first."""
        try:
            outcome = ray.get(ref)
        except RayActorError as error:
            if error.actor_init_failed:
                raise _startup_failure(error) from None
            self.pids.pop(actor, None)
            print(
                f"evomerge: the Ray worker on node {self.nodes.pop(actor, '?')} died mid-candidate; Ray restarts it "
                "where it can, and the candidate is queued again",
                file=sys.stderr,
                flush=True,
            )
            self._restarting[actor.ready.remote()] = actor
            return None
        # A kill may cross the finished call; the actor is then restarting and must not take work yet.
        if job.timed_out:
            self._restarting[actor.ready.remote()] = actor
        return outcome

    def _give_up(self, job: _Job) -> str:
        why = f"ran past executor.timeout_s={self.timeout_s}" if job.timed_out else "its Ray worker died"
        return (
            f"{why} on each of {self.max_tries} tries (executor.max_tries); "
            "a worker that dies is out of memory, hit a CUDA error or was killed: see the Ray logs"
        )

    def _await_restart(self, ref: ray.ObjectRef) -> None:
        actor = self._restarting.pop(ref)
        try:
            pid, node, startup_error, started = ray.get(ref)
        except RayActorError as error:
            raise _startup_failure(error) from None
        if startup_error is not None:
            raise EvomergeError(*startup_error)
        if self.on_worker is not None and self.pids.get(actor) != pid:  # a new process: a start or a restart
            self.on_worker(started)
        self.pids[actor], self.nodes[actor] = pid, node
        self._idle.append(actor)

    def _wait_s(self, lines: dict[ray.actor.ActorHandle, deque[_Job]]) -> float | None:
        """How long to wait for a result before the next candidate runs out of time (None: no limit)."""
        clocks = [line[0].started for line in lines.values() if not line[0].timed_out]
        if self.timeout_s is None or not clocks:
            return None
        return max(0.0, min(clocks) + self.timeout_s - time.monotonic())

    def _kill_overdue(self, lines: dict[ray.actor.ActorHandle, deque[_Job]]) -> None:
        now = time.monotonic()
        for actor, line in lines.items():
            running = line[0]
            if not running.timed_out and now - running.started >= self.timeout_s:
                running.timed_out = True
                ray.kill(actor, no_restart=False)  # Ray restarts it; its calls fail, the running one counted


def _connect(address: str | None) -> bool:
    """Join Ray (``address``) or start a local instance (None); True if this process started it."""
    if ray.is_initialized():
        return False
    try:
        if address is None:
            # "local": never attach to another user's instance on a shared machine by accident.
            ray.init(address="local", num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False)
            return True
        ray.init(address=address)
    except ConnectionError as error:
        raise EvomergeError(
            f"could not join the Ray cluster at executor.address={address} ({error})",
            "start the cluster first (`ray start --head`, or `ray up scripts/cluster/cluster.yaml`), "
            "or set executor.address=null to start a local Ray instance",
        ) from None
    return False


def cluster_gpus(address: str) -> int:
    """The GPUs of the Ray cluster at ``address`` (joined, for the pool that follows)."""
    _connect(address)
    return int(ray.cluster_resources().get("GPU", 0))


def _slots(*, on_gpu: bool, threads: int, gpus: int, resources: dict[str, float]) -> int:
    """One worker per ``gpus`` GPUs, or per ``threads`` CPUs, and per ``resources``, that the cluster has
    free now (what others hold would leave workers waiting for a place, and the pool with them)."""
    free = ray.available_resources()
    count = int(free.get("GPU", 0)) // gpus if on_gpu else int(free.get("CPU", 0)) // threads
    for name, need in resources.items():
        count = min(count, int(free.get(name, 0) // need))
    return max(count, 1)


def _check_room(count: int, *, on_gpu: bool, threads: int, gpus: int, resources: dict[str, float]) -> None:
    """A pool larger than the cluster would wait forever for actors that cannot be placed."""
    total = ray.cluster_resources()
    have, cpus = int(total.get("GPU", 0)), int(total.get("CPU", 0))
    for name, need in resources.items():
        if total.get(name, 0) < count * need:
            raise EvomergeError(
                f"the pool needs {count * need:g} of the Ray resource '{name}' ({count} workers x "
                f"executor.resources.{name}={need:g}) but the Ray cluster has {total.get(name, 0):g}",
                f"start the worker nodes with `ray start --resources='{{\"{name}\": N}}'`, or lower "
                "executor.num_workers, or drop it from executor.resources",
            )
    if on_gpu and have < count * gpus:
        raise EvomergeError(
            f"the pool needs {count * gpus} GPU(s) ({count} workers x executor.gpus_per_worker={gpus}) but the "
            f"Ray cluster has {have}",
            "lower executor.num_workers or executor.gpus_per_worker, add GPU nodes, or use device=cpu",
        )
    if cpus < count * threads:
        raise EvomergeError(
            f"the pool needs {count * threads} CPUs ({count} workers x executor.threads={threads}) "
            f"but the Ray cluster has {cpus}",
            "lower executor.num_workers or executor.threads, or add nodes",
        )


def _startup_failure(error: RayActorError) -> EvomergeError:
    # Ray's message ends with the worker's own exception line; the lines above are Ray's frame.
    last = [line.strip() for line in str(error).splitlines() if line.strip()][-1]
    return EvomergeError(
        f"a Ray worker failed while starting: {last}",
        "read the worker's error above (e.g. evomerge missing on a node, or a path the node cannot read); "
        "every node needs evomerge installed and the models at the same paths",
    )
