"""Only candidates scored on every item are results: export (``--rank``, ``--pareto``), twin's shared model
and the summary never take a row a race stopped early or an estimated generation scored on its anchors."""

from __future__ import annotations

import json

from evomerge.export import export_run
from evomerge.recipe.plain import load_any_recipe
from evomerge.search.progress import summary_table
from evomerge.search.run_folder import fully_scored
from evomerge.search.session import start
from evomerge.search.state import SearchState
from tests.test_racing import toy_racing_config


def test_export_never_picks_a_partly_scored_candidate(toy_world, tmp_path):
    run_dir = tmp_path / "run"
    start(toy_racing_config(toy_world, run_dir, "racing.enabled=false", "budget.evaluations=8"), run_dir)
    log = run_dir / "evaluations.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(fully_scored(row) for row in rows)
    # The worst candidate becomes one a race stopped after 16 of 94 items, with an estimate above every
    # real score: it ranked first by its number, which is not a result.
    worst = min(range(len(rows)), key=lambda i: rows[i]["scores"][0])
    rows[worst] |= {"items": [16, 94], "scores": [2.0]}
    log.write_text("".join(json.dumps(row) + "\n" for row in rows))
    real = sorted((row for row in rows if fully_scored(row)), key=lambda row: -row["scores"][0])

    (folder,) = export_run(run_dir, tmp_path / "best")
    assert load_any_recipe(folder / "evomerge_recipe.yaml").to_plain() == real[0]["recipe"]
    (second,) = export_run(run_dir, tmp_path / "second", rank=2)
    assert load_any_recipe(second / "evomerge_recipe.yaml").to_plain() == real[1]["recipe"]


def test_the_summary_counts_the_partly_scored_candidates():
    state = SearchState(optimizer={})
    state.cache = {"a": ((0.5,), {"m": 0.5}, None, [94, 94]), "b": ((0.9,), {"m": 0.9}, None, [16, 94])}
    assert "1 scored on part of the items" in summary_table(state, ["m"])
    assert "part of the items" not in summary_table(SearchState(optimizer={}), ["m"])
