"""Estimated fitness (evomerge/search/estimate.py): anchors for every candidate, every item for each
generation's best estimate, a killed run resumed to the identical log, and the real toy world end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evomerge.errors import EvomergeError
from evomerge.evaluate.irt import AnchorEstimator
from evomerge.executor.worker import Outcome
from evomerge.search.estimate import ESTIMATE_SUFFIX, FIT_FILE, Estimate, estimator_error
from evomerge.search.run_folder import RunFolder
from tests.test_racing import toy_racing_config
from tests.test_search_loop import fitness, search

ITEMS = 200
THRESHOLDS = np.random.default_rng(1).random(ITEMS)  # item k is right iff THRESHOLDS[k] < the model's p


def answers(p: float) -> list[float]:
    return [float(t < p) for t in THRESHOLDS]


def estimator(anchors: int = 20) -> AnchorEstimator:
    """Fitted on three endpoints right on 20%, 50% and 80% of the items."""
    return AnchorEstimator.fit([answers(0.2), answers(0.5), answers(0.8)], n_anchors=anchors, dims=1, seed=0)


class PositionScorer:
    """Per-item correctness of candidate ``p`` (a number) at the positions asked for; records each call."""

    def __init__(self, p_of=float, *, crash_after: int | None = None) -> None:
        self.p_of = p_of
        self.crash_after = crash_after
        self.calls: list[tuple[object, int]] = []  # (candidate, items scored)

    def __call__(self, recipes, subset):
        for position, recipe in enumerate(recipes):
            if self.crash_after is not None and len(self.calls) >= self.crash_after:
                raise KeyboardInterrupt("simulated kill")
            values = [answers(self.p_of(recipe))[k] for k in subset.positions]
            self.calls.append((recipe, len(values)))
            yield position, Outcome(metrics=None, error=None, seconds=0.0, item_values=values, items_total=ITEMS)


def test_every_candidate_sees_the_anchors_and_the_best_estimate_every_item():
    fitted = estimator()
    scorer = PositionScorer()
    estimate = Estimate(score_items=scorer, metric="toy/acc", estimator=fitted, total=ITEMS)
    outcomes = dict(estimate([0.3, 0.7, 0.45]))
    k = len(fitted.anchors)
    assert scorer.calls == [(0.3, k), (0.7, k), (0.45, k), (0.7, ITEMS - k)]
    best = outcomes[1]
    assert best.metrics["toy/acc"] == sum(answers(0.7)) / ITEMS  # the real accuracy, from every item
    assert len(best.item_values) == ITEMS and sorted(best.item_values) == sorted(answers(0.7))
    # Three fitted endpoints pin the items only roughly: the estimate lands within 0.15 (0.10 here).
    assert abs(best.metrics["toy/acc" + ESTIMATE_SUFFIX] - best.metrics["toy/acc"]) < 0.15
    for i, p in ((0, 0.3), (2, 0.45)):
        anchors_seen = [answers(p)[a] for a in fitted.anchors]
        assert outcomes[i].item_values == anchors_seen and outcomes[i].items_total == ITEMS
        assert outcomes[i].metrics == {"toy/acc": fitted.estimate(anchors_seen)}
        assert abs(outcomes[i].metrics["toy/acc"] - p) < 0.15


def estimated_search(path, scorer):
    evaluate = Estimate(score_items=scorer, metric="toy/acc", estimator=estimator(), total=ITEMS)
    return search(path, evaluate, evaluations=32)


def test_a_killed_estimated_search_resumes_to_the_identical_log(tmp_path):
    def p_of(recipe):
        return min(1.0, 1 + fitness(recipe))

    straight = PositionScorer(p_of)
    state = estimated_search(tmp_path / "straight", straight)
    rows = RunFolder(tmp_path / "straight").read_evaluations()
    assert len(rows) == 32
    full = [row for row in rows if row["items"] == [ITEMS, ITEMS]]
    assert len(full) == 4  # one per generation of 8: its best estimate
    assert sum(items for _, items in straight.calls) == 32 * 20 + 4 * (ITEMS - 20)
    assert rows[state.best.index]["items"] == [ITEMS, ITEMS]
    assert estimator_error(rows, "toy/acc")[2] == 4
    with pytest.raises(KeyboardInterrupt):
        estimated_search(tmp_path / "crashed", PositionScorer(p_of, crash_after=len(straight.calls) // 2))
    crashed = RunFolder(tmp_path / "crashed")
    assert 0 < len(crashed.read_evaluations()) < 32
    estimated_search(tmp_path / "crashed", PositionScorer(p_of))
    assert crashed.read_evaluations() == rows


def test_an_estimated_search_on_the_toy_world(toy_world, tmp_path, capsys):
    """Through the real worker and lm-eval: the endpoints' full results fit the estimator once (cached in
    the run folder, read again on resume), candidates see the anchors, and the reported best is scored
    on every item with lm-eval's own accuracy."""
    from evomerge.executor.worker import Worker, WorkerSpec
    from evomerge.recipe.recipe import Recipe
    from evomerge.search.session import resume, start, task_set

    run_dir = tmp_path / "run"
    overrides = ["racing.enabled=false", "estimate.enabled=true", "estimate.anchors=8", "optimizer.popsize=4"]
    cfg = toy_racing_config(toy_world, run_dir, *overrides)
    state = start(cfg, run_dir)
    total = sum(1 for _ in (toy_world.tasks_dir / "toy_math" / "test.jsonl").open())
    fit = json.loads((run_dir / FIT_FILE).read_text())
    assert fit["models"] == [str(toy_world.base), str(toy_world.experts["math"]), str(toy_world.experts["lang"])]
    assert fit["items_scored"] == 3 * total and len(fit["estimator"]["anchors"]) <= 8
    # The math expert's full results: right on most math items, unlike the base.
    assert sum(fit["responses"][1]) > sum(fit["responses"][0])
    rows = RunFolder(run_dir).read_evaluations()
    assert {tuple(row["items"]) for row in rows} <= {(len(fit["estimator"]["anchors"]), total), (total, total)}
    assert rows[state.best.index]["items"] == [total, total]
    best = Recipe.from_plain(state.best.recipe, where="best")
    full = Worker(WorkerSpec(template=best, tasks=task_set(cfg))).evaluate(best)
    assert state.best.metrics["toy_math/acc"] == pytest.approx(full.metrics["toy_math/acc"], abs=1e-12)
    assert "estimated fitness: |IRT estimate - accuracy on every item|" in capsys.readouterr().out
    written = (run_dir / FIT_FILE).stat().st_mtime_ns
    resume(run_dir, ["budget.evaluations=8"], force=True)
    assert (run_dir / FIT_FILE).stat().st_mtime_ns == written
    assert "scoring" not in capsys.readouterr().out.split("IRT fitted")[0]  # read from the run folder


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["estimate.anchors=1000"], "estimate.anchors=1000"),
        (["racing.enabled=true"], "racing.enabled=True"),
        (["estimate.anchors=0"], "estimate.anchors"),
    ],
)
def test_estimated_fitness_refuses_what_it_cannot_estimate(toy_world, tmp_path, extra, message):
    from evomerge.search.session import start

    overrides = ["racing.enabled=false", "estimate.enabled=true", *extra]
    with pytest.raises(EvomergeError, match=message):
        start(toy_racing_config(toy_world, tmp_path / "run", *overrides), tmp_path / "run")
    assert not (tmp_path / "run" / FIT_FILE).exists()


def test_lm_eval_scores_items_at_given_positions(toy_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate.lm_eval_scorer import ItemSubset, LMEvalScorer, TaskSet

    model = AutoModelForCausalLM.from_pretrained(toy_world.experts["math"])
    tasks = TaskSet(names=("toy_math",), include_path=str(toy_world.tasks_dir))
    scorer = LMEvalScorer(model=model, tokenizer=AutoTokenizer.from_pretrained(toy_world.base), tasks=tasks)
    every, _ = scorer.score_items(ItemSubset(metric="toy_math/acc"))
    positions = (7, 2, 11, 0)
    picked, _ = scorer.score_items(ItemSubset(metric="toy_math/acc", positions=positions))
    assert picked == [every[p] for p in positions]


def test_a_run_folder_from_before_estimated_fitness_resumes(toy_world, tmp_path):
    """Run folders written before `estimate` existed have no such key in config.yaml: a resume reads the
    default (off) instead of failing on the missing key."""
    import yaml

    from evomerge.search.session import resume, start

    run_dir = tmp_path / "run"
    start(toy_racing_config(toy_world, run_dir, "racing.enabled=false", "optimizer.popsize=4"), run_dir)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["estimate"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    state = resume(run_dir, ["budget.evaluations=8"], force=True)
    assert state.evaluations == 8
