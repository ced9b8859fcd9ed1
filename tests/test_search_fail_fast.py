"""An error every candidate hits stops the search after the first few, and a resume goes on once it is fixed."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from evomerge.config import CONF_DIR, register_configs
from evomerge.errors import EvomergeError
from evomerge.evaluate.lm_eval_scorer import LMEvalScorer
from evomerge.search.run_folder import RunFolder
from evomerge.search.session import resume, start


def config(world, run_dir, *extra):
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                f"run_dir={run_dir}",
                f"models.base={world.base}",
                f"models.experts=[{world.experts['math']},{world.experts['lang']}]",
                f"tasks.include_path={world.tasks_dir}",
                "tasks.names=[toy_math]",
                "tasks.limit=4",
                "objectives=[{name: math, terms: {toy_math/acc: 1.0}}]",
                "method=task_arithmetic",
                "optimizer.popsize=4",
                "budget.evaluations=8",
                "seed=3",
                *extra,
            ],
        )


def test_the_first_three_failing_alike_stop_the_search_which_resumes_once_fixed(
    toy_world, tmp_path, monkeypatch, capsys
):
    run_dir = tmp_path / "run"
    scored = []

    def broken(self):
        scored.append(1)
        raise RuntimeError("the task's dataset cannot be read")

    monkeypatch.setattr(LMEvalScorer, "score", broken)
    with pytest.raises(EvomergeError, match="the first 3 candidates all failed with the same error") as caught:
        start(config(toy_world, run_dir), run_dir)
    message = str(caught.value)
    # The error with its last frames, and the way on.
    assert "RuntimeError: the task's dataset cannot be read" in message and "in broken" in message
    assert f"evomerge resume {run_dir}" in message
    assert len(scored) == 3  # the fourth candidate of the generation was never scored
    logged = RunFolder(run_dir).read_evaluations()
    assert [row["error"].splitlines()[0] for row in logged] == ["RuntimeError: the task's dataset cannot be read"] * 3
    assert all(row["scores"] == [None] for row in logged)

    monkeypatch.undo()
    capsys.readouterr()
    state = resume(run_dir, [], force=False)
    assert state.evaluations == 8 and state.best is not None
    logged = RunFolder(run_dir).read_evaluations()
    assert [row["error"] is not None for row in logged] == [True] * 3 + [False] * 5  # replayed, then scored
    assert "(8 distinct, 3 failed)" in capsys.readouterr().out


def test_failures_that_differ_or_are_mixed_with_successes_do_not_stop_it(toy_world, tmp_path, monkeypatch):
    real = LMEvalScorer.score
    calls = []

    def flaky(self):
        calls.append(1)
        if len(calls) % 2:
            raise ValueError(f"candidate {len(calls)} is bad")
        return real(self)

    monkeypatch.setattr(LMEvalScorer, "score", flaky)
    run_dir = tmp_path / "run"
    state = start(config(toy_world, run_dir, "budget.fail_fast=2"), run_dir)
    assert state.evaluations == 8 and len(calls) == 8


def test_fail_fast_is_a_positive_count_or_off(toy_world, tmp_path):
    with pytest.raises(EvomergeError, match="budget.fail_fast=0 is not allowed"):
        start(config(toy_world, tmp_path / "run", "budget.fail_fast=0"), tmp_path / "run")


def test_a_run_logged_with_the_old_yaml_keys_resumes_exactly(toy_world, tmp_path):
    """Keys were one line of YAML before they were JSON: a resume computes them again from the recipes."""
    import json

    import yaml

    straight = tmp_path / "straight"
    start(config(toy_world, straight), straight)
    old = tmp_path / "old"
    start(config(toy_world, old, "budget.evaluations=4"), old)
    log = old / "evaluations.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    for row in rows:
        row["key"] = yaml.dump(row["recipe"], sort_keys=True, default_flow_style=True, width=1 << 30)
    log.write_text("".join(json.dumps(row) + "\n" for row in rows))
    resume(old, ["budget.evaluations=8"], force=True)

    def logged(run_dir):
        return [(row["recipe"], row["scores"], row["cached"]) for row in RunFolder(run_dir).read_evaluations()]

    assert logged(old) == logged(straight) and len(logged(old)) == 8
