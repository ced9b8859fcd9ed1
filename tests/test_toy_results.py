"""scripts/toy_results.py: the marked section it rewrites, the curves it plots, and one real run on the tiny world."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.evaluate.lm_eval_scorer import LMEvalScorer, TaskSet
from evomerge.search.run_folder import RunFolder

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))


def test_marked_section_is_replaced_in_place_or_appended_keeping_the_rest(scripts, tmp_path):
    from toy_comparison import write_marked_section

    out = tmp_path / "results.md"
    out.write_text("# by hand\nkept above")
    write_marked_section(out, "<!-- a -->", "<!-- /a -->", "first\n")
    assert out.read_text() == "# by hand\nkept above\n\n<!-- a -->\nfirst\n<!-- /a -->\n"
    out.write_text(out.read_text() + "kept below\n")
    write_marked_section(out, "<!-- a -->", "<!-- /a -->", "second")
    assert out.read_text() == "# by hand\nkept above\n\n<!-- a -->\nsecond\n<!-- /a -->\nkept below\n"
    fresh = tmp_path / "new.md"
    write_marked_section(fresh, "<!-- a -->", "<!-- /a -->", "only")
    assert fresh.read_text() == "<!-- a -->\nonly\n<!-- /a -->\n"


def test_best_so_far_is_taken_at_each_generation_end_and_skips_failed_candidates(scripts):
    from toy_plots import best_per_generation

    rows = [
        {"generation": 0, "scores": [0.1]},
        {"generation": 0, "scores": [None]},
        {"generation": 1, "scores": [0.3]},
        {"generation": 1, "scores": [0.2]},
        {"generation": 2, "scores": [0.25]},
    ]
    assert best_per_generation(rows) == ([2, 4, 5], [0.1, 0.3, 0.3])


@pytest.mark.e2e
def test_one_run_writes_the_table_and_both_plots_and_the_plots_redraw_from_its_runs(scripts, toy_world, tmp_path):
    from toy_results import BEGIN, END, draw_plots

    # The script finds the world in its cache: point a fresh cache at the session's tiny world.
    cache = tmp_path / "cache"
    (cache / "toy").mkdir(parents=True)
    (cache / "toy" / toy_world.root.name).symlink_to(toy_world.root)
    out, work, figures = tmp_path / "toy_world.md", tmp_path / "work", tmp_path / "figures"
    out.write_text(f"# by hand\n\n{BEGIN}\nstale table\n{END}\n\nreading kept\n")
    command = [
        sys.executable, str(SCRIPTS / "toy_results.py"), "--seeds", "1", "--budget", "4", "--generation-size", "4",
        "--skip", "dfs,ps_dfs", "--ps-overrides", "genome.layer_groups=2",
        "--work", str(work), "--out", str(out), "--figures", str(figures),
        "--", "toy.size=tiny",
    ]  # fmt: skip
    env = {**os.environ, "EVOMERGE_CACHE": str(cache), "PYTHONPATH": str(SCRIPTS.parent)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    text = out.read_text()
    assert text.startswith("# by hand\n\n" + BEGIN) and text.endswith(f"{END}\n\nreading kept\n")
    assert "stale table" not in text and "--skip dfs,ps_dfs" in text
    table = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in text.splitlines() if line.startswith("| ")}
    names = [*(toy_world.tasks[s] for s in ("lang", "math", "combined"))]
    names += [toy_world.holdout_tasks[s] for s in ("lang", "math", "combined")]
    assert table["model"] == [*names, "evaluations |"]
    assert list(table)[1:] == [
        "---",
        "chance (most common answer)",
        "base",
        "expert: math",
        "expert: lang",
        "task arithmetic (weight 1 each)",
        "TIES (density 0.5, weight 1 each)",
        "DARE-TIES (density 0.5, weight 1 each)",
        "random search (PS)",
        "best PS merge (CMA-ES)",
    ]
    # The base row is the base model scored here, column by column.
    scorer = LMEvalScorer(
        model=AutoModelForCausalLM.from_pretrained(toy_world.base, dtype=torch.float32),
        tokenizer=AutoTokenizer.from_pretrained(toy_world.base),
        tasks=TaskSet(names=tuple(names), include_path=str(toy_world.tasks_dir), batch_size=64),
    )
    metrics = scorer.score()
    assert table["base"] == [f"{metrics[f'{n}/acc']:.3f}" for n in names] + ["– |"]
    # Chance: the share of a task's items whose answer is its most common one.
    answers = [[json.loads(line)["answer"] for line in open(toy_world.tasks_dir / n / "test.jsonl")] for n in names]
    chance = [max(a.count(x) for x in a) / len(a) for a in answers]
    assert table["chance (most common answer)"] == [f"{c:.3f}" for c in chance] + ["– |"]
    # One seed: the PS row is that run's best, as logged during the search, on the search tasks.
    best = RunFolder(work / "ps-1").load_checkpoint().best.metrics
    assert table["best PS merge (CMA-ES)"][:3] == [f"{best[f'{n}/acc']:.3f}" for n in names[:3]]
    assert table["best PS merge (CMA-ES)"][-1] == "4 |"
    # --ps-overrides reach the random, PS and NSGA-II runs; the NSGA-II run has the two skills as objectives.
    configs = {run: OmegaConf.load(work / f"{run}-1" / "config.yaml") for run in ("random", "ps", "pareto")}
    assert [c.genome.layer_groups for c in configs.values()] == [2, 2, 2]
    assert [dict(o.terms) for o in configs["pareto"].objectives] == [{"toy_lang/acc": 1.0}, {"toy_math/acc": 1.0}]

    for png in ("toy_fitness.png", "toy_pareto.png"):
        assert (figures / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        (figures / png).unlink()
    draw_plots(work, figures, ["toy_fitness.png", "toy_pareto.png"])  # what --plots-only does, in this process
    assert (figures / "toy_fitness.png").exists() and (figures / "toy_pareto.png").exists()
    assert out.read_text() == text  # --plots-only leaves the table alone
