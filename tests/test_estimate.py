"""Estimated fitness (evomerge/search/estimate.py): anchors for every candidate, every item for each
generation's best estimate, a killed run resumed to the identical log, and the real toy world end to end."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from evomerge.errors import EvomergeError
from evomerge.evaluate import irt
from evomerge.evaluate.irt import AnchorEstimator
from evomerge.executor.worker import Outcome
from evomerge.search.estimate import (
    ESTIMATE_SUFFIX,
    FIT_FILE,
    Estimate,
    Fit,
    SampleMean,
    estimator_error,
    fitted_estimator,
)
from evomerge.search.run_folder import RunFolder
from tests.test_racing import toy_racing_config
from tests.test_search_loop import fitness, search

ITEMS = 200
THRESHOLDS = np.random.default_rng(1).random(ITEMS)  # item k is right iff THRESHOLDS[k] < the model's p


def answers(p: float) -> list[float]:
    return [float(t < p) for t in THRESHOLDS]


ENDPOINTS = [answers(0.2), answers(0.5), answers(0.8)]  # three endpoints right on 20%, 50% and 80% of the items


def estimator(anchors: int = 20) -> AnchorEstimator:
    return AnchorEstimator.fit(ENDPOINTS, n_anchors=anchors, dims=1, seed=0)


class P(float):
    """A hand-built candidate: its number is the share of items it gets right; its key is that number."""

    def canonical(self) -> str:
        return repr(float(self))


@functools.cache
def endpoints_fit() -> str:
    return json.dumps(Fit.of(ENDPOINTS, n_anchors=20, dims=1, seed=0, refit=False).record)


def fit(*, refit: bool, path=None, warmup: int = 0) -> Fit:
    """``Fit.of(ENDPOINTS, ...)``, fitted once for the whole module (a copy each time)."""
    settings = {"n_anchors": 20, "dims": 1, "seed": 0}
    return Fit(path=path, record=json.loads(endpoints_fit()), settings=settings, refit=refit, warmup=warmup)


class PositionScorer:
    """Per-item correctness of candidate ``p`` (a number) at the positions asked for; records each call."""

    def __init__(self, p_of=float, *, crash_after: int | None = None) -> None:
        self.p_of = p_of
        self.crash_after = crash_after
        self.calls: list[tuple[object, int]] = []  # (candidate, items scored)
        self.positions: list[list[int]] = []  # the items of each call, in the order asked for

    def __call__(self, recipes, subset):
        for position, recipe in enumerate(recipes):
            if self.crash_after is not None and len(self.calls) >= self.crash_after:
                raise KeyboardInterrupt("simulated kill")
            self.positions.append(subset.positions_in(ITEMS))
            values = [answers(self.p_of(recipe))[k] for k in self.positions[-1]]
            self.calls.append((recipe, len(values)))
            yield position, Outcome(metrics=None, error=None, seconds=0.0, item_values=values, items_total=ITEMS)


def test_every_candidate_sees_the_anchors_and_the_best_estimate_every_item():
    fitted = estimator()
    scorer = PositionScorer()
    estimate = Estimate(score_items=scorer, metric="toy/acc", fit=fit(refit=False))
    outcomes = dict(estimate([0.3, 0.7, 0.45], generation=0))
    k = len(fitted.anchors)
    assert scorer.calls == [(0.3, k), (0.7, k), (0.45, k), (0.7, ITEMS - k)]
    best = outcomes[1]
    assert best.metrics["toy/acc"] == sum(answers(0.7)) / ITEMS  # the real accuracy, from every item
    assert best.item_values == answers(0.7)  # in item order
    # Three fitted endpoints pin the items only roughly: the estimate lands within 0.15 (0.10 here).
    error = best.metrics["toy/acc"] - best.metrics["toy/acc" + ESTIMATE_SUFFIX]
    assert abs(error) < 0.15
    for i, p in ((0, 0.3), (2, 0.45)):
        anchors_seen = [answers(p)[a] for a in fitted.anchors]
        assert outcomes[i].item_values == anchors_seen and outcomes[i].items_total == ITEMS
        raw = fitted.estimate(anchors_seen)
        # One scale: the others are told their estimates shifted by the verified best's error, so the
        # best (told its real accuracy) stays above them, as its estimate was.
        assert outcomes[i].metrics == {"toy/acc": raw + error, "toy/acc" + ESTIMATE_SUFFIX: raw}
        assert outcomes[i].metrics["toy/acc"] < best.metrics["toy/acc"]
        assert abs(raw - p) < 0.15


def test_a_verified_best_keeps_its_place_where_its_estimate_was_too_high():
    """The winner's curse: the top estimate is likely an overestimate. Told its real accuracy beside the
    others' raw estimates, it would drop below candidates it beat; shifted, the order is the estimates'."""
    fitted = fit(refit=False)
    overestimated = {0.5: 1.0}  # candidate 0.5 answers every anchor right, the rest as a 0.5 would
    anchors = set(int(a) for a in fitted.estimator.anchors)

    def score(recipes, subset):
        for position, p in enumerate(recipes):
            values = [answers(overestimated.get(p, p) if k in anchors else p)[k] for k in subset.positions_in(ITEMS)]
            yield position, Outcome(metrics=None, error=None, seconds=0.0, item_values=values, items_total=ITEMS)

    outcomes = dict(Estimate(score_items=score, metric="toy/acc", fit=fitted)([0.5, 0.6], generation=0))
    best, other = outcomes[0].metrics, outcomes[1].metrics
    assert best["toy/acc" + ESTIMATE_SUFFIX] > other["toy/acc" + ESTIMATE_SUFFIX]
    assert best["toy/acc"] < other["toy/acc" + ESTIMATE_SUFFIX]  # its real accuracy is below the other's estimate
    assert best["toy/acc"] > other["toy/acc"]  # but what each is told keeps the estimates' order


def test_refit_learns_each_generations_best_one_generation_late():
    fitted = fit(refit=True)
    first = fitted.estimator
    dict(Estimate(score_items=PositionScorer(), metric="toy/acc", fit=fitted)([P(0.3), P(0.7)], generation=0))
    assert fitted.record["learned"] == [{"key": "0.7", "generation": 0, "values": answers(0.7)}]
    again = AnchorEstimator.fit([*ENDPOINTS, answers(0.7)], n_anchors=20, dims=1, seed=0, start=first)
    assert fitted.estimator.state() == again.state() and again.state() != first.state()
    # Generation 1 is scored while that fit runs (on a thread): it is estimated with the one before.
    assert fitted.estimator_for(1).state() == first.state()
    scorer = PositionScorer()
    outcomes = dict(Estimate(score_items=scorer, metric="toy/acc", fit=fitted)([P(0.6)], generation=2))
    # Generation 2 is scored on the new fit's anchors: all of them, then every other item.
    assert scorer.calls == [(0.6, len(again.anchors)), (0.6, ITEMS - len(again.anchors))]
    assert outcomes[0].metrics["toy/acc" + ESTIMATE_SUFFIX] == again.estimate([answers(0.6)[a] for a in again.anchors])
    not_refitted = fit(refit=False)
    dict(Estimate(score_items=PositionScorer(), metric="toy/acc", fit=not_refitted)([0.3, 0.7], generation=0))
    assert not_refitted.record["learned"] == [] and not_refitted.estimator.state() == first.state()


def test_a_warmup_generation_is_scored_on_every_item_and_fitted_on():
    fitted = fit(refit=False, warmup=1)
    scorer = PositionScorer()
    outcomes = dict(Estimate(score_items=scorer, metric="toy/acc", fit=fitted)([P(0.3), P(0.6)], generation=0))
    assert scorer.calls == [(0.3, ITEMS), (0.6, ITEMS)]
    assert outcomes[1].metrics == {"toy/acc": sum(answers(0.6)) / ITEMS} and outcomes[1].items_total == ITEMS
    assert [entry["key"] for entry in fitted.record["learned"]] == ["0.3", "0.6"]
    # Generation 1 already uses it (fitted once, refit off): the warmup is what the fit starts with.
    endpoints = AnchorEstimator.from_state(fitted.record["estimator"])
    warm = AnchorEstimator.fit([*ENDPOINTS, answers(0.3), answers(0.6)], n_anchors=20, dims=1, seed=0, start=endpoints)
    assert fitted.estimator_for(1).state() == warm.state() == fitted.estimator_for(5).state()


def test_refit_tells_items_apart_where_every_endpoint_fails():
    """The case refit and the warmup are for: endpoints right on 0%, 2% and 4% of the items (a skill none
    of them has) pin nothing, so a fit on them alone misjudges a candidate right on 60% (by 0.42); fitted
    again on one candidate scored on every item (right on 40%), it misses by less than a third of that."""
    endpoints = [answers(0.0), answers(0.02), answers(0.04)]
    once = Fit.of(endpoints, n_anchors=10, dims=1, seed=0, refit=True)
    truth = sum(answers(0.6)) / ITEMS
    far = abs(once.estimator.estimate([answers(0.6)[a] for a in once.estimator.anchors]) - truth)
    once.learn(0, [P(0.4)], [answers(0.4)])
    near = abs(once.estimator.estimate([answers(0.6)[a] for a in once.estimator.anchors]) - truth)
    assert far > 0.3 and near < 0.15, (far, near)


def test_verify_within_skips_the_full_scoring_that_cannot_pay(capsys):
    """With ``verify_within``, a generation whose best estimate (calibrated by the last verified error) is
    further than that below the best accuracy so far is told its estimates, and nothing is scored on
    every item; one within it is verified as always."""
    fitted = fit(refit=False, warmup=1)
    scorer = PositionScorer()
    estimate = Estimate(score_items=scorer, metric="toy/acc", fit=fitted, verify_within=0.155)
    dict(estimate([P(0.3), P(0.75)], generation=0))  # warmup: the best so far is 0.75's accuracy
    best_so_far = sum(answers(0.75)) / ITEMS
    assert fitted.best_verified() == (best_so_far, 0.0)
    scorer.calls.clear()
    k = len(fitted.estimator_for(1).anchors)
    outcomes = dict(estimate([P(0.4), P(0.5)], generation=1))
    assert scorer.calls == [(0.4, k), (0.5, k)]  # anchors only: 0.5 cannot come within 0.05 of 0.75
    assert all(o.items_total == ITEMS and len(o.item_values) == k for o in outcomes.values())
    for o in outcomes.values():  # one scale: no verified error yet, so each is told its estimate
        assert o.metrics["toy/acc"] == o.metrics["toy/acc" + ESTIMATE_SUFFIX]
    assert "not scored on every item" in capsys.readouterr().out
    scorer.calls.clear()
    outcomes = dict(estimate([P(0.4), P(0.8)], generation=2))
    assert scorer.calls == [(0.4, k), (0.8, k), (0.8, ITEMS - k)]  # within reach: verified
    accuracy = sum(answers(0.8)) / ITEMS
    error = accuracy - outcomes[1].metrics["toy/acc" + ESTIMATE_SUFFIX]
    assert outcomes[1].metrics["toy/acc"] == accuracy and fitted.best_verified() == (accuracy, error)
    scorer.calls.clear()
    outcomes = dict(estimate([P(0.5)], generation=3))  # skipped again: told its estimate plus that error
    assert scorer.calls == [(0.5, k)]
    assert outcomes[0].metrics["toy/acc"] == outcomes[0].metrics["toy/acc" + ESTIMATE_SUFFIX] + error
    plain = PositionScorer()
    always = Estimate(score_items=plain, metric="toy/acc", fit=fit(refit=False, warmup=1))
    dict(always([P(0.3), P(0.75)], generation=0))
    plain.calls.clear()
    dict(always([P(0.5)], generation=1))
    assert plain.calls == [(0.5, k), (0.5, ITEMS - k)]  # null, the default: every generation's best is verified


def test_the_mean_estimator_draws_one_sample_per_generation_and_verifies_the_best_on_the_rest(tmp_path):
    """``estimate.estimator=mean``: no endpoints and no fit. A generation's candidates all see the same 20
    items, drawn again in the next generation; a candidate's estimate is its mean there, and the best one
    is scored on the other 180 items, told its real accuracy, the others their means shifted by its error."""
    sample = SampleMean.of(tmp_path, anchors=20, seed=(3, 0))
    assert json.loads((tmp_path / FIT_FILE).read_text()) == {"estimator": "mean", "items_scored": 0, "verified": []}
    scorer = PositionScorer()
    estimate = Estimate(score_items=scorer, metric="toy/acc", fit=sample)
    outcomes = dict(estimate([P(0.3), P(0.7), P(0.5)], generation=0))
    assert scorer.calls == [(0.3, 20), (0.7, 20), (0.5, 20), (0.7, ITEMS - 20)]
    drawn = scorer.positions[0]
    assert scorer.positions[1] == scorer.positions[2] == drawn and len(set(drawn)) == 20
    assert sorted(drawn + scorer.positions[3]) == list(range(ITEMS))  # the best: the other items, once each
    best = outcomes[1]
    accuracy = sum(answers(0.7)) / ITEMS
    assert best.metrics["toy/acc"] == accuracy and best.item_values == answers(0.7)  # in item order
    error = accuracy - sum(answers(0.7)[k] for k in drawn) / 20
    for i, p in ((0, 0.3), (2, 0.5)):
        mean = sum(answers(p)[k] for k in drawn) / 20
        assert outcomes[i].metrics == {"toy/acc": pytest.approx(mean + error), "toy/acc" + ESTIMATE_SUFFIX: mean}
    assert json.loads((tmp_path / FIT_FILE).read_text())["verified"] == [
        {"generation": 0, "accuracy": accuracy, "error": pytest.approx(error)}
    ]
    scorer.positions.clear()
    dict(estimate([P(0.3), P(0.7)], generation=1))
    assert scorer.positions[0] == scorer.positions[1] != drawn  # a new sample for the next generation
    again = PositionScorer()
    dict(
        Estimate(score_items=again, metric="toy/acc", fit=SampleMean.of(tmp_path / "b", anchors=20, seed=(3, 0)))(
            [P(0.3)], generation=1
        )
    )
    assert again.positions[0] == scorer.positions[0]  # drawn from the run's seed and the generation alone


def test_the_mean_estimator_refuses_a_sample_as_large_as_the_task(tmp_path):
    estimate = Estimate(
        score_items=PositionScorer(), metric="toy/acc", fit=SampleMean.of(tmp_path, anchors=ITEMS, seed=(0, 0))
    )
    with pytest.raises(EvomergeError, match=f"estimate.anchors={ITEMS}, but toy/acc has {ITEMS} items"):
        dict(estimate([P(0.3)], generation=0))


def test_a_run_folder_keeps_the_estimator_it_was_started_with(tmp_path):
    (tmp_path / "irt").mkdir()
    fit(refit=False, path=tmp_path / "irt" / FIT_FILE).write()
    with pytest.raises(EvomergeError, match=r"estimate.estimator=irt, and this run asks for the other"):
        SampleMean.of(tmp_path / "irt", anchors=20, seed=(0, 0))
    SampleMean.of(tmp_path, anchors=20, seed=(0, 0))
    with pytest.raises(EvomergeError, match=r"estimate.estimator=mean, and this run asks for the other"):
        fitted_estimator(
            tmp_path, None, "toy/acc", anchors=20, dims=1, seed=0, refit=False, warmup=0, score_models=None
        )


def estimated_search(path, scorer, *, refit=False, warmup=0, evaluations=32, verify_within=None, mean=False):
    path.mkdir(parents=True, exist_ok=True)
    if mean:
        fitted = SampleMean.of(path, anchors=20, seed=(0, 0), warmup=warmup)
    elif (path / FIT_FILE).exists():
        fitted = Fit.read(path, n_anchors=20, dims=1, seed=0, refit=refit, warmup=warmup)
    else:
        fitted = fit(refit=refit, warmup=warmup, path=path / FIT_FILE)
        fitted.write()
    evaluate = Estimate(score_items=scorer, metric="toy/acc", fit=fitted, verify_within=verify_within)
    return search(path, evaluate, evaluations=evaluations)


def p_of(recipe):
    return min(1.0, 1 + fitness(recipe))


def test_a_killed_search_on_the_mean_estimator_resumes_to_the_identical_log(tmp_path):
    straight = PositionScorer(p_of)
    estimated_search(tmp_path / "straight", straight, mean=True, verify_within=0.1)
    rows = RunFolder(tmp_path / "straight").read_evaluations()
    assert {tuple(row["items"]) for row in rows} == {(20, ITEMS), (ITEMS, ITEMS)}
    record = json.loads((tmp_path / "straight" / FIT_FILE).read_text())
    with pytest.raises(KeyboardInterrupt):
        crash = PositionScorer(p_of, crash_after=len(straight.calls) - 3)
        estimated_search(tmp_path / "crashed", crash, mean=True, verify_within=0.1)
    estimated_search(tmp_path / "crashed", PositionScorer(p_of), mean=True, verify_within=0.1)
    assert RunFolder(tmp_path / "crashed").read_evaluations() == rows
    assert json.loads((tmp_path / "crashed" / FIT_FILE).read_text()) == record


@pytest.mark.parametrize("refit", [False, True])
def test_a_killed_estimated_search_resumes_to_the_identical_log(tmp_path, refit):
    straight = PositionScorer(p_of)
    state = estimated_search(tmp_path / "straight", straight, refit=refit)
    rows = RunFolder(tmp_path / "straight").read_evaluations()
    assert len(rows) == 32
    full = [row for row in rows if row["items"] == [ITEMS, ITEMS]]
    assert len(full) == 4  # one per generation of 8: its best estimate
    assert sum(items for _, items in straight.calls) == 32 * 20 + 4 * (ITEMS - 20)
    assert rows[state.best.index]["items"] == [ITEMS, ITEMS]
    assert estimator_error(rows, "toy/acc")[2] == 4
    with pytest.raises(KeyboardInterrupt):
        estimated_search(tmp_path / "crashed", PositionScorer(p_of, crash_after=len(straight.calls) // 2), refit=refit)
    crashed = RunFolder(tmp_path / "crashed")
    assert 0 < len(crashed.read_evaluations()) < 32
    estimated_search(tmp_path / "crashed", PositionScorer(p_of), refit=refit)
    assert crashed.read_evaluations() == rows
    learned = json.loads((tmp_path / "straight" / FIT_FILE).read_text())["learned"]
    assert len(learned) == (4 if refit else 0)
    assert json.loads((tmp_path / "crashed" / FIT_FILE).read_text())["learned"] == learned


def test_a_killed_search_that_skips_verifications_resumes_to_the_identical_log(tmp_path):
    straight = PositionScorer(p_of)
    estimated_search(tmp_path / "straight", straight, warmup=1, verify_within=0.15)
    rows = RunFolder(tmp_path / "straight").read_evaluations()
    full = [row for row in rows if row["items"] == [ITEMS, ITEMS]]
    assert 8 < len(full) < 8 + 3  # the warmup generation, then not every later generation's best
    record = json.loads((tmp_path / "straight" / FIT_FILE).read_text())
    assert [e["generation"] for e in record["verified"]] == [row["generation"] for row in full][7:]
    with pytest.raises(KeyboardInterrupt):
        estimated_search(
            tmp_path / "crashed",
            PositionScorer(p_of, crash_after=len(straight.calls) - 3),
            warmup=1,
            verify_within=0.15,
        )
    estimated_search(tmp_path / "crashed", PositionScorer(p_of), warmup=1, verify_within=0.15)
    assert RunFolder(tmp_path / "crashed").read_evaluations() == rows
    assert json.loads((tmp_path / "crashed" / FIT_FILE).read_text())["verified"] == record["verified"]


def test_a_kill_after_any_row_of_a_generation_resumes_to_the_identical_log(tmp_path, monkeypatch):
    """A kill between two rows of a generation leaves part of it logged: the resumed run scores that
    generation again whole, and forgets what the killed one learned from it, instead of replaying those
    rows and estimating the rest apart (another best, another fit)."""
    monkeypatch.setattr(irt, "_REFIT_STEPS", 100)  # the fits' quality is not what is tested here, their sameness is
    straight = tmp_path / "straight"
    estimated_search(straight, PositionScorer(p_of), refit=True, warmup=1, evaluations=24)
    rows = RunFolder(straight).read_evaluations()
    learned = json.loads((straight / FIT_FILE).read_text())["learned"]
    appended = RunFolder.append_evaluation
    for kill_after in range(17, 24):  # after each row of generation 2 (rows 16 to 23) but its last
        run_dir = tmp_path / f"killed-{kill_after}"
        count = {"rows": 0}

        def dying_append(self, row, count=count, kill_after=kill_after):
            if count["rows"] == kill_after:
                raise KeyboardInterrupt("simulated kill")
            count["rows"] += 1
            appended(self, row)

        monkeypatch.setattr(RunFolder, "append_evaluation", dying_append)
        with pytest.raises(KeyboardInterrupt):
            estimated_search(run_dir, PositionScorer(p_of), refit=True, warmup=1, evaluations=24)
        monkeypatch.setattr(RunFolder, "append_evaluation", appended)
        estimated_search(run_dir, PositionScorer(p_of), refit=True, warmup=1, evaluations=24)
        assert RunFolder(run_dir).read_evaluations() == rows, kill_after
        assert json.loads((run_dir / FIT_FILE).read_text())["learned"] == learned, kill_after


def test_an_estimated_search_on_the_toy_world(toy_world, tmp_path, capsys):
    """Through the real worker and lm-eval: the endpoints' full results fit the estimator once (cached in
    the run folder, read again on resume), candidates see the anchors, and the reported best is scored
    on every item with lm-eval's own accuracy."""
    from evomerge.executor.worker import Worker, WorkerSpec
    from evomerge.recipe.recipe import Recipe
    from evomerge.search.session import resume, start, task_set

    run_dir = tmp_path / "run"
    overrides = ["racing.enabled=false", "estimate.enabled=true", "estimate.anchors=8", "optimizer.popsize=4"]
    overrides.append("estimate.warmup=0")
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
    assert "estimated fitness: |estimate - accuracy on every item|" in capsys.readouterr().out
    assert [entry["key"] for entry in fit["learned"]] == [row["key"] for row in rows if row["items"][0] == total]
    resume(run_dir, ["budget.evaluations=8"], force=True)
    again = json.loads((run_dir / FIT_FILE).read_text())
    assert again["responses"] == fit["responses"] and again["learned"][: len(fit["learned"])] == fit["learned"]
    assert len(again["learned"]) == len(fit["learned"]) + 1  # the resumed generation's best
    assert "scoring" not in capsys.readouterr().out.split("IRT fitted")[0]  # read from the run folder


def test_a_search_on_the_mean_estimator_on_the_toy_world(toy_world, tmp_path, capsys):
    """Through the real worker and lm-eval: nothing is scored before the first candidate, candidates see 8
    items, and the reported best is scored on every item with lm-eval's own accuracy."""
    from evomerge.executor.worker import Worker, WorkerSpec
    from evomerge.recipe.recipe import Recipe
    from evomerge.search.session import start, task_set

    run_dir = tmp_path / "run"
    overrides = ["racing.enabled=false", "estimate.enabled=true", "estimate.estimator=mean", "estimate.anchors=8"]
    cfg = toy_racing_config(toy_world, run_dir, *overrides, "optimizer.popsize=4")
    state = start(cfg, run_dir)
    total = sum(1 for _ in (toy_world.tasks_dir / "toy_math" / "test.jsonl").open())
    out = capsys.readouterr().out
    assert "on every item of" not in out and "a random sample of 8 items of toy_math/acc" in out
    rows = RunFolder(run_dir).read_evaluations()
    assert {tuple(row["items"]) for row in rows} == {(8, total), (total, total)}
    assert len([row for row in rows if row["items"] == [total, total]]) == len(rows) // 4  # one per generation
    assert json.loads((run_dir / FIT_FILE).read_text())["items_scored"] == 0
    assert "estimated fitness: |estimate - accuracy on every item|" in out
    best = Recipe.from_plain(state.best.recipe, where="best")
    full = Worker(WorkerSpec(template=best, tasks=task_set(cfg))).evaluate(best)
    assert state.best.metrics["toy_math/acc"] == pytest.approx(full.metrics["toy_math/acc"], abs=1e-12)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["estimate.anchors=1000"], "estimate.anchors=1000"),
        (["estimate.estimator=mean", "estimate.anchors=1000"], "estimate.anchors=1000, but toy_math/acc has"),
        (["estimate.estimator=tiny"], "estimate.estimator=tiny"),
        (["racing.enabled=true"], "racing.enabled=True"),
        (["estimate.anchors=0"], "estimate.anchors"),
        (["estimate.verify_within=1.5"], "estimate.verify_within=1.5"),
        (["estimate.verify_within=nan"], "estimate.verify_within=nan"),
    ],
)
def test_estimated_fitness_refuses_what_it_cannot_estimate(toy_world, tmp_path, extra, message):
    from evomerge.search.session import start

    overrides = ["racing.enabled=false", "estimate.enabled=true", *extra]
    with pytest.raises(EvomergeError, match=message):
        start(toy_racing_config(toy_world, tmp_path / "run", *overrides), tmp_path / "run")
    assert not RunFolder(tmp_path / "run").read_evaluations()
    assert not (tmp_path / "run" / FIT_FILE).exists() or "estimator=mean" in extra[0]  # the mean's record is empty


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
