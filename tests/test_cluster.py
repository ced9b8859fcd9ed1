"""A Ray cluster, simulated with Ray's own ``ray.cluster_utils.Cluster``: a head node and two worker nodes
on this machine, each with its own CPU and a custom resource ``fake_gpu`` standing in for its GPU; the
head has none, so it holds no worker and does no model work. The models sit in one folder every node sees
(the toy world). The driver runs the README's cluster command (``evomerge search executor=ray
executor.address=auto ...``) on the head, and its evaluations log equals the serial run's, though a
worker node is removed mid-search.

One cluster serves the module (its start costs seconds); the searches are small.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from ray.cluster_utils import Cluster

from evomerge.search.run_folder import RunFolder
from evomerge.search.session import start
from tests.test_executor_ray import rows, search_config

# As a real cluster's GPUs: the workers ask for one each, and only the worker nodes have one.
WORKER_NODE = {"num_cpus": 1, "resources": {"fake_gpu": 1}}
ON_FAKE_GPUS = ("executor=ray", "executor.address=auto", "executor.threads=1", "executor.resources={fake_gpu: 1}")
SMALL = ("budget.evaluations=24",)


@pytest.fixture(scope="module")
def cluster():
    # The test process never joins: each driver below joins by executor.address=auto, as on a head node.
    simulated = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [simulated.add_node(**WORKER_NODE) for _ in range(2)]
    simulated.wait_for_nodes()
    yield simulated, workers
    simulated.shutdown()


@pytest.fixture(scope="module")
def serial_rows(toy_world, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("serial") / "run"
    start(search_config(toy_world, run_dir, "executor.threads=1", *SMALL)[0], run_dir)
    return rows(run_dir)


def driver(cluster, toy_world, run_dir) -> subprocess.Popen:
    """``evomerge search`` on the head node, joining the cluster as the README's command does."""
    simulated, _ = cluster
    _, overrides = search_config(toy_world, run_dir, *ON_FAKE_GPUS, *SMALL)
    return subprocess.Popen(
        [sys.executable, "-m", "evomerge.cli", "search", *overrides],
        env={**os.environ, "RAY_ADDRESS": simulated.address},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.e2e
def test_a_search_spreads_over_the_worker_nodes_survives_losing_one_and_equals_the_serial_one(
    cluster, toy_world, tmp_path, serial_rows
):
    """One worker on each worker node (the head, without a fake GPU, holds none). A node removed mid-search
    takes its worker and the candidate it was scoring with it; that candidate runs again on the other node.
    (One search shows both: each driver's workers take ~20 s to start on this machine.)"""
    simulated, workers = cluster
    run_dir = tmp_path / "run"
    search = driver(cluster, toy_world, run_dir)
    deadline = time.time() + 240
    while time.time() < deadline and len(RunFolder(run_dir).read_evaluations()) < 3 and search.poll() is None:
        time.sleep(0.05)
    assert search.poll() is None, search.communicate()[1][-3000:]
    simulated.remove_node(workers[0])
    out, err = search.communicate(timeout=300)
    assert search.returncode == 0, err[-3000:]
    nodes = ", ".join(sorted(node.node_id for node in workers))
    assert [line for line in out.splitlines() if "Ray worker(s) on" in line] == [
        f"evomerge: 2 Ray worker(s) on 2 node(s): {nodes}"
    ]
    assert "device=cpu (the Ray cluster at auto has 0 GPU(s))" in out  # auto asked the cluster
    assert f"evomerge: the Ray worker on node {workers[0].node_id} died mid-candidate" in err
    assert rows(run_dir) == serial_rows
    assert all(row["error"] is None for row in RunFolder(run_dir).read_evaluations())
