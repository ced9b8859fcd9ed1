"""End-to-end searches on the tiny toy world through the real CLI, Hydra config and lm-eval.

Marked e2e: slower than unit tests, still run in CI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.evaluate.lm_eval_scorer import LMEvalScorer
from evomerge.export import export_run
from evomerge.search.run_folder import RunFolder
from evomerge.search.session import task_set

pytestmark = pytest.mark.e2e


def overrides(world, run_dir, *extra):
    return [
        f"run_dir={run_dir}",
        f"models.base={world.base}",
        f"models.experts=[{world.experts['math']},{world.experts['lang']}]",
        f"tasks.include_path={world.tasks_dir}",
        "tasks.names=[toy_math,toy_lang]",
        "tasks.limit=12",
        "objectives=[{name: mean_skill, terms: {toy_math/acc: 0.5, toy_lang/acc: 0.5}}]",
        "method.name=task_arithmetic",
        "optimizer.popsize=4",
        "budget.evaluations=12",
        "seed=5",
        *extra,
    ]


def evomerge(*args, env=None, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "evomerge.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


def finished(args):
    proc = evomerge(*args)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def rows(run_dir):
    return [(r["key"], r["scores"], r["proposal"]) for r in RunFolder(run_dir).read_evaluations()]


@pytest.fixture(scope="module")
def straight_run(toy_world, tmp_path_factory):
    """One uninterrupted search, the reference the other tests compare against."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    finished(["search", *overrides(toy_world, run_dir)])
    return run_dir


def kill_when_logged(run_dir, proc, count):
    deadline = time.time() + 300
    while time.time() < deadline and len(RunFolder(run_dir).read_evaluations()) < count:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_search_killed_with_sigkill_resumes_to_the_same_result(toy_world, tmp_path, straight_run):
    reference = rows(straight_run)
    assert len(reference) == 12 and (straight_run / "fitness.png").exists()

    run_dir = tmp_path / "killed"
    # Meant to land mid-generation; on a loaded machine a generation of these tiny candidates can finish
    # between two polls, so only "before the end" is asserted (test_search_checkpoint.py kills mid-generation
    # deterministically, in process).
    kill_when_logged(run_dir, evomerge("search", *overrides(toy_world, run_dir)), 2)
    assert 0 < len(RunFolder(run_dir).read_evaluations()) < 12
    kill_when_logged(run_dir, evomerge("resume", str(run_dir)), 5)  # just past a checkpoint
    assert len(RunFolder(run_dir).read_evaluations()) < 12
    finished(["resume", str(run_dir)])
    assert rows(run_dir) == reference
    a, b = RunFolder(run_dir).load_checkpoint(), RunFolder(straight_run).load_checkpoint()
    assert a.best.recipe == b.best.recipe and a.best.scores == b.best.scores


def test_resume_refuses_a_changed_config_unless_forced(straight_run, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(straight_run, run_dir)
    proc = evomerge("resume", str(run_dir), "seed=6")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "seed: 5 -> 6" in err and "--force" in err and "Traceback" not in err
    finished(["resume", str(run_dir), "budget.evaluations=16", "--force"])
    assert rows(run_dir)[:12] == rows(straight_run) and len(rows(run_dir)) == 16


def test_export_reproduces_the_logged_score(straight_run, tmp_path):
    (out,) = export_run(straight_run, tmp_path / "best")
    best = RunFolder(straight_run).load_checkpoint().best
    assert (out / "evomerge_recipe.yaml").exists() and (out / "mergekit_config.yml").exists()
    assert "mean_skill" in (out / "README.md").read_text()

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    cfg = OmegaConf.load(straight_run / "config.yaml")
    metrics = LMEvalScorer(model=model, tokenizer=tokenizer, tasks=task_set(cfg)).score()
    assert metrics == best.metrics


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("budget.evaluations=abc", "budget.evaluations"),
        ("optimizer=simulated_annealing", "optimizer/simulated_annealing"),
        ("dtype=int8", "int8"),
        ("budget.evaluations=0", "budget.evaluations=0 is not allowed"),
        ("genome.layer_groups=99", "genome.layer_groups = 99 is out of range"),
    ],
)
def test_bad_overrides_name_the_key_and_value(toy_world, tmp_path, override, message):
    """Composed in-process through the real conf/ (as `evomerge search` does), then started."""
    from hydra import compose, initialize_config_dir

    from evomerge.config import CONF_DIR, register_configs
    from evomerge.errors import EvomergeError
    from evomerge.search.session import start

    register_configs()
    with pytest.raises(Exception, match=message) as caught, initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        start(compose("config", overrides=overrides(toy_world, tmp_path / "run", override)), tmp_path / "run")
    if isinstance(caught.value, EvomergeError):
        assert not (tmp_path / "run").exists()  # nothing written: the same command, fixed, starts cleanly


def test_the_cli_reports_a_bad_override_without_traceback(toy_world, tmp_path):
    proc = evomerge("search", *overrides(toy_world, tmp_path / "run", "budget.evaluations=0"))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "budget.evaluations=0 is not allowed" in err and "Traceback" not in err
