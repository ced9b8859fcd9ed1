"""The README's first command: the demo searches the toy world, exports the best and prints it beside the
parents and the default merge."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import evomerge.toy.world as world_module
from evomerge.demo import run_demo
from evomerge.evaluate.lm_eval_scorer import LMEvalScorer, TaskSet
from evomerge.toy import ToyWorld


def test_demo_exports_the_best_and_scores_the_parents_as_they_are(
    toy_world: ToyWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(world_module, "default_root", lambda: toy_world.root.parent)  # the session's tiny world
    run_demo(out_dir=tmp_path, overrides=["toy.size=tiny", "budget.evaluations=8", "optimizer.popsize=4"])
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| model |"))
    columns = [cell.strip() for cell in header.strip("|").split("|")][1:]
    rows = {}
    for line in out.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("model", "---", "objective", "combined"):
            rows[cells[0]] = dict(zip(columns, map(float, cells[1:]), strict=True))
    assert set(rows) == {"base", "math expert", "lang expert", "default merge", "best merge (searched)"}

    # The "math expert" row is a task-arithmetic merge with weights (1, 0): it must score what the expert
    # itself scores, loaded straight from its folder.
    tokenizer = AutoTokenizer.from_pretrained(toy_world.base)
    expert = AutoModelForCausalLM.from_pretrained(toy_world.experts["math"])
    tasks = TaskSet(names=tuple(toy_world.tasks.values()), include_path=str(toy_world.tasks_dir), batch_size=64)
    direct = LMEvalScorer(model=expert, tokenizer=tokenizer, tasks=tasks).score()
    assert rows["math expert"] == pytest.approx(
        {name: direct[name] for name in columns}, abs=5e-4
    )  # printed to 3 places

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "best")
    assert exported.config.num_hidden_layers == expert.config.num_hidden_layers
