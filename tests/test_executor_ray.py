"""The Ray executor on the tiny toy world: a local pool of workers scores like the serial worker, loses
nothing when a worker is killed, times out, surfaces a worker's startup error, and resumes a killed run.

One local Ray instance serves the module (its start costs seconds); every pool is a real one.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import ray
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.config import CONF_DIR, check_config, register_configs
from evomerge.errors import EvomergeError
from evomerge.evaluate.lm_eval_scorer import ItemSubset, LMEvalScorer, TaskSet
from evomerge.executor.ray_pool import RayExecutor, WorkerActor
from evomerge.executor.serial import SerialExecutor
from evomerge.executor.worker import Worker, WorkerSpec
from evomerge.recipe.recipe import Recipe
from evomerge.search.run_folder import RunFolder
from evomerge.search.session import resume, start


def recipe(world, math_weight: float, lang_weight: float) -> Recipe:
    return Recipe.from_plain(
        {
            "method": "task_arithmetic",
            "base": str(world.base),
            "models": [
                {"model": str(world.experts["math"]), "weight": math_weight},
                {"model": str(world.experts["lang"]), "weight": lang_weight},
            ],
            "dtype": "float32",
        }
    )


@pytest.fixture(scope="module")
def spec(toy_world) -> WorkerSpec:
    tasks = TaskSet(names=("toy_math", "toy_lang"), include_path=str(toy_world.tasks_dir), limit=40)
    return WorkerSpec(template=recipe(toy_world, 0.5, 0.5), tasks=tasks)


@pytest.fixture(scope="module")
def candidates(toy_world) -> list[Recipe]:
    return [recipe(toy_world, 0.2 * i, 1.0 - 0.1 * i) for i in range(8)]


@pytest.fixture(scope="module")
def serial_metrics(spec, candidates) -> list[dict[str, float]]:
    executor = SerialExecutor(spec=spec, threads=1)
    return [outcome.metrics for _, outcome in executor.evaluate(candidates)]


@pytest.fixture(scope="module")
def local_ray():
    # Four logical CPUs on this 2-core box: the shared pool (2) and one more pool fit side by side.
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(local_ray, spec):
    executor = RayExecutor(spec=spec, num_workers=2, address=None, threads=1, max_tries=2, timeout_s=None)
    yield executor
    executor.close()


def by_position(results) -> list:
    return [outcome for _, outcome in sorted(results, key=lambda pair: pair[0])]


def test_the_sources_must_fit_the_device(spec, monkeypatch):
    # Tiny Llama: embeddings and lm_head 111x32 each, final norm 32, and per layer q/k/v/o 32x32,
    # gate/up/down 64x32, two norms of 32: 3552*2 + 32 + 2*(4*1024 + 3*2048 + 64) = 27,744 floats.
    # task_arithmetic keeps the working model, the base and both task vectors: 4 copies x 4 bytes. The disk
    # tier keeps the model and one tensor's three inputs (the largest, an embedding: 3,552 floats each). Both
    # count that tensor's three inputs as read again, before they are stacked (executor/memory.py).
    spec = dataclasses.replace(spec, reserve_bytes=0)
    resident, disk = 27_744 * 4 * 4 + 3 * 3_552 * 4, 27_744 * 4 + 2 * 3 * 3_552 * 4
    monkeypatch.setattr("evomerge.executor.memory.free_bytes", lambda device: resident)
    assert Worker(spec).memory.tier == "resident"  # exactly enough is enough
    monkeypatch.setattr("evomerge.executor.memory.free_bytes", lambda device: resident - 1)
    worker = Worker(spec)
    assert worker.memory.tier == "disk" and sum(worker.memory.device_parts.values()) == disk
    monkeypatch.setattr("evomerge.executor.memory.free_bytes", lambda device: disk - 1)
    with pytest.raises(EvomergeError) as caught:
        Worker(spec)
    message = str(caught.value)
    assert "fits no memory tier" in message and f"resident needs {resident / 2**30:.2f} GiB" in message
    assert "dtype=bfloat16" in message and "fewer models" in message and "more free memory" in message


@pytest.mark.e2e
def test_a_pool_of_two_scores_every_candidate_like_the_serial_worker(pool, candidates, serial_metrics):
    assert len(set(pool.worker_pids())) == 2
    results = list(pool.evaluate(candidates))
    assert sorted(position for position, _ in results) == list(range(len(candidates)))
    assert [outcome.metrics for outcome in by_position(results)] == serial_metrics
    assert len(set(map(str, serial_metrics))) > 2  # the candidates do score differently


@pytest.mark.e2e
def test_a_worker_killed_mid_run_loses_nothing(pool, candidates, serial_metrics):
    victim = pool.worker_pids()[0]
    results = []
    for position, outcome in pool.evaluate(candidates * 2):
        if len(results) == 1:
            os.kill(victim, signal.SIGKILL)
        results.append((position, outcome))
    outcomes = by_position(results)
    assert [o.error for o in outcomes] == [None] * 16
    assert [o.metrics for o in outcomes] == serial_metrics * 2
    assert victim not in pool.worker_pids()


@pytest.mark.e2e
def test_a_candidate_queued_behind_a_killed_one_is_not_charged_a_try(local_ray, spec, candidates, serial_metrics):
    # 8 candidates on 2 workers: each worker runs one and holds one queued behind it (the queue still
    # has more than 2 waiting), so the kill takes a running candidate and a queued one. With one try
    # allowed, only the running one may come back failed.
    executor = RayExecutor(spec=spec, num_workers=2, address=None, threads=1, max_tries=1, timeout_s=None)
    try:
        victim = executor.worker_pids()[0]
        results = []
        for position, outcome in executor.evaluate(candidates):
            if not results:
                os.kill(victim, signal.SIGKILL)
            results.append((position, outcome))
    finally:
        executor.close()
    outcomes = by_position(results)
    failed = [i for i, o in enumerate(outcomes) if o.error is not None]
    assert len(failed) == 1
    assert outcomes[failed[0]].error.startswith("its Ray worker died on each of 1 tries")
    assert [o.metrics for i, o in enumerate(outcomes) if i not in failed] == [
        m for i, m in enumerate(serial_metrics) if i not in failed
    ]


@pytest.mark.e2e
def test_a_candidate_past_its_timeout_is_failed_and_the_one_queued_behind_it_runs(local_ray, spec, candidates):
    # One worker, three candidates: the second is queued behind the first when the first is killed
    # for its timeout; it must get a try of its own (and time out itself), not share the first's.
    executor = RayExecutor(spec=spec, num_workers=1, address=None, threads=1, max_tries=1, timeout_s=0.001)
    try:
        first = executor.worker_pids()
        outcomes = by_position(executor.evaluate(candidates[:3]))
    finally:
        executor.close()
    assert len(first) == 1
    assert [o.metrics for o in outcomes] == [None] * 3
    assert all(o.error.startswith("ran past executor.timeout_s=0.001 on each of 1 tries") for o in outcomes)


def cpus_free_once_settled(expected: float) -> float:
    """Ray's free CPUs after up to 30 s for them to reach ``expected``: a killed actor gives its CPU
    back a moment after ``ray.kill`` returns, so a count read at once may still miss it."""
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) != expected and time.time() < deadline:
        time.sleep(0.1)
    return ray.available_resources().get("CPU", 0)


@pytest.mark.e2e
def test_a_worker_startup_error_reaches_the_driver_as_itself(local_ray, pool, spec, tmp_path):
    missing = tmp_path / "not_on_this_node"
    bad = replace(spec, template=replace(spec.template, base=str(missing)))
    # Only the module's pool holds CPUs (threads=1: one per worker); pools of earlier tests were killed.
    idle = ray.cluster_resources()["CPU"] - len(pool.actors)
    assert cpus_free_once_settled(idle) == idle
    with pytest.raises(EvomergeError, match=f"model folder '{missing}' does not exist") as caught:
        RayExecutor(spec=bad, num_workers=1, address=None, threads=1, max_tries=1, timeout_s=None)
    assert "Traceback" not in str(caught.value) and "ray::" not in str(caught.value)
    assert cpus_free_once_settled(idle) == idle  # the worker that reported the error was let go


def test_a_pool_asking_for_a_resource_no_node_has_is_refused_before_it_waits_forever(local_ray, spec):
    with pytest.raises(EvomergeError) as caught:
        RayExecutor(
            spec=spec, num_workers=2, address=None, threads=1, max_tries=1, timeout_s=None, resources={"fake_gpu": 1}
        )
    assert str(caught.value).startswith(
        "the pool needs 2 of the Ray resource 'fake_gpu' (2 workers x executor.resources.fake_gpu=1) but the Ray "
        "cluster has 0. start the worker nodes with `ray start --resources='{\"fake_gpu\": N}'`"
    )


def device_fails_once(marker):
    """A WorkerActor whose model runs out of GPU memory on the first candidate it materializes after
    ``marker`` appears (the marker is then removed: a restarted worker sees a healthy device)."""

    class FlakyDevice(WorkerActor):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            materialize = self.worker.merger.materialize

            def failing(recipe):
                if marker.exists():
                    marker.unlink()
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
                return materialize(recipe)

            self.worker.merger.materialize = failing

    return FlakyDevice


@pytest.mark.e2e
def test_a_worker_whose_device_fails_is_restarted_and_its_candidate_run_again(
    local_ray, spec, candidates, serial_metrics, tmp_path, monkeypatch
):
    """Out of memory or a CUDA error leaves a worker's process suspect: it exits, Ray restarts it, and the
    candidate is scored again (a try counted), not scored worst by a worker that stays broken."""
    marker = tmp_path / "fail-next"
    monkeypatch.setattr("evomerge.executor.ray_pool.WorkerActor", device_fails_once(marker))
    executor = RayExecutor(spec=spec, num_workers=1, address=None, threads=1, max_tries=2, timeout_s=None)
    try:
        before = executor.worker_pids()
        marker.touch()
        outcomes = by_position(executor.evaluate(candidates[:3]))
        after = executor.worker_pids()
    finally:
        executor.close()
    assert not marker.exists()  # the device did fail, once
    assert [o.error for o in outcomes] == [None] * 3
    assert [o.metrics for o in outcomes] == serial_metrics[:3]
    assert len(before) == len(after) == 1 and before != after  # a new process


def test_the_serial_executor_stops_on_a_device_failure_and_says_to_resume(spec, candidates):
    """In one process there is nothing to restart: the search stops with the way on (a resume scores the
    candidate again in a fresh process); a candidate's own error still only fails that candidate."""
    executor = SerialExecutor(spec=spec, threads=1)

    def fails(recipe):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    executor.worker.merger.materialize = fails
    with pytest.raises(EvomergeError, match="illegal memory access") as caught:
        list(executor.evaluate(candidates[:2]))
    assert "evomerge resume RUN_DIR" in str(caught.value)

    def bad_candidate(recipe):
        raise ValueError("della: density 0.9 with epsilon 0.15 gives keep probabilities outside (0, 1)")

    executor.worker.merger.materialize = bad_candidate
    (position, outcome), *_ = executor.evaluate(candidates[:2])
    assert position == 0 and outcome.metrics is None and outcome.error.startswith("ValueError: della")


def driver_scored(ref: str, tasks: TaskSet, subset: ItemSubset) -> list[float]:
    """What the estimate's endpoint scoring did before it moved to the workers: the whole model on one
    device of the driver, with its own tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    return LMEvalScorer(model=model, tokenizer=AutoTokenizer.from_pretrained(ref), tasks=tasks).score_items(subset)[0]


@pytest.fixture(scope="module")
def endpoints(toy_world, spec) -> tuple[list[str], ItemSubset, list[list[float]]]:
    refs = [str(toy_world.base), str(toy_world.experts["math"]), str(toy_world.experts["lang"])]
    subset = ItemSubset(metric="toy_math/acc")
    expected = [driver_scored(ref, spec.tasks, subset) for ref in refs]
    assert len(expected[0]) == 40 and len(set(map(tuple, expected))) > 1  # they do score differently
    return refs, subset, expected


def test_the_serial_worker_scores_the_endpoints_as_the_driver_did(spec, endpoints):
    """Placed as the worker places its model: across two devices here (the placement's code path, on the
    CPU); the pool's workers below place theirs on one."""
    refs, subset, expected = endpoints
    executor = SerialExecutor(spec=replace(spec, gpus_per_worker=2), threads=1)
    assert list(executor.score_models(refs, subset)) == expected


@pytest.mark.e2e
def test_a_pool_scores_the_endpoints_on_its_workers_as_the_driver_did(pool, endpoints):
    refs, subset, expected = endpoints
    assert list(pool.score_models(refs, subset)) == expected


@pytest.mark.e2e
def test_an_endpoint_a_worker_cannot_score_stops_the_fit_with_the_workers_error(pool, endpoints, tmp_path):
    refs, subset, _ = endpoints
    with pytest.raises(EvomergeError) as caught:
        list(pool.score_models([refs[0], str(tmp_path / "missing")], subset))
    message = str(caught.value)
    assert message.startswith(f"a Ray worker failed while scoring '{tmp_path / 'missing'}' on every item")
    assert "give every node the models at the same paths" in message and "Traceback" not in message


GENERATIONS = ("optimizer.popsize=4",)  # CMA-ES, generations of 4
ASYNCHRONOUS = ("optimizer=tpe", "optimizer.batch_size=4", "optimizer.n_startup_trials=4", "in_flight=4")


def search_config(world, run_dir, *extra, mode=GENERATIONS):
    register_configs()
    overrides = [
        f"run_dir={run_dir}",
        f"models.base={world.base}",
        f"models.experts=[{world.experts['math']},{world.experts['lang']}]",
        f"tasks.include_path={world.tasks_dir}",
        "tasks.names=[toy_math,toy_lang]",
        "tasks.limit=40",
        "objectives=[{name: mean_skill, terms: {toy_math/acc: 0.5, toy_lang/acc: 0.5}}]",
        "method.name=task_arithmetic",
        *mode,
        "budget.evaluations=40",
        "seed=5",
        *extra,
    ]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides), overrides


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["executor=ray", "executor.max_tries=0"], "executor.max_tries=0 is not allowed. use a positive number"),
        (["executor=ray", "executor.timeout_s=-1"], "executor.timeout_s=-1.0 is not allowed"),
        (["executor=ray", "executor.threads=0"], "executor.threads=0 is not allowed"),
        (["executor=ray", "executor.num_workers=0"], "executor.num_workers=0 is not allowed"),
        (["executor=ray", "device=cuda:1"], "device=cuda:1 is not allowed. use device=cuda"),
        (["executor.timeout_s=60"], "executor.timeout_s=60.0 is not allowed. use executor=ray"),
        (["executor=ray", "executor.kind=dask"], "executor.kind"),
        (["executor=ray", "executor.resources={fake_gpu: 0}"], "executor.resources.fake_gpu=0 is not allowed"),
        (["executor.resources={fake_gpu: 1}"], "executor.resources={'fake_gpu': 1} is not allowed. use executor=ray"),
        (["executor=ray", "executor.resources=4"], "executor.resources=4 is not allowed. use {name: amount}"),
    ],
)
def test_bad_executor_settings_name_the_key_and_value(toy_world, tmp_path, override, message):
    with pytest.raises(Exception, match=message):
        check_config(search_config(toy_world, tmp_path, *override)[0])


def test_the_ray_config_composes_and_checks(toy_world, tmp_path):
    cfg, _ = search_config(toy_world, tmp_path, "executor=ray")
    check_config(cfg)
    assert (cfg.executor.kind, cfg.executor.threads, cfg.executor.max_tries) == ("ray", 1, 3)


def rows(run_dir):
    return [(r["key"], r["scores"], r["proposal"]) for r in RunFolder(run_dir).read_evaluations()]


@pytest.mark.e2e
@pytest.mark.parametrize("mode", [GENERATIONS, ASYNCHRONOUS], ids=["generations", "asynchronous"])
def test_a_killed_ray_driver_resumes_to_the_serial_result(local_ray, toy_world, tmp_path, mode):
    serial_dir, ray_dir = tmp_path / "serial", tmp_path / "ray"
    cfg, _ = search_config(toy_world, serial_dir, "executor.threads=1", mode=mode)
    start(cfg, serial_dir)

    # The driver joins this module's Ray instance, as `executor.address=auto` joins a cluster.
    join = [f"executor.address={local_ray}", "executor.num_workers=2"]
    _, overrides = search_config(toy_world, ray_dir, "executor=ray", *join, mode=mode)
    driver = subprocess.Popen(
        [sys.executable, "-m", "evomerge.cli", "search", *overrides],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(RunFolder(ray_dir).read_evaluations()) < 6 and driver.poll() is None:
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    _, err = driver.communicate()
    assert 6 <= len(rows(ray_dir)) < 40, err[-3000:]

    resume(ray_dir, [], force=False)
    assert rows(ray_dir) == rows(serial_dir)
    assert [proposal for _, _, proposal in rows(ray_dir)] == list(range(40))
    assert len({scores[0] for _, scores, _ in rows(ray_dir)}) > 2  # the candidates do score differently
    a, b = RunFolder(ray_dir).load_checkpoint(), RunFolder(serial_dir).load_checkpoint()
    assert a.best.recipe == b.best.recipe and a.best.scores == b.best.scores


def test_cmaes_cannot_run_asynchronously(toy_world, tmp_path):
    cfg, _ = search_config(toy_world, tmp_path / "run", "in_flight=4")
    with pytest.raises(EvomergeError, match="in_flight=4 asks one candidate at a time, which CMAESOptimizer cannot"):
        start(cfg, tmp_path / "run")
