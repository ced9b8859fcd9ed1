"""Estimated fitness: each candidate is scored on a few anchor items of the objective's task, and its
accuracy on every item is estimated by item-response theory (evaluate/irt.py, tinyBenchmarks' gp-IRT).

At the start of a run, the base and every expert are scored on every item of the task, once; the IRT
model is fitted on those results and its anchors chosen (``estimate.anchors`` items). Both are cached in
the run folder (``irt.json``), so a resumed run reads them instead of scoring the endpoints again. With
``estimate.refit`` (the default), the model is fitted again after each generation on every candidate
scored on every item so far as well (``Fit``), at no cost in items.

In each generation every candidate is scored on the anchors and the optimizer is told its estimate. The
generation's best estimate is then scored on the task's other items as well, and the optimizer is told
its real accuracy: so every candidate that can become the run's best has been scored on every item
(loop.py reports only those), and each such row logs the estimate beside the real value
(``<metric>@estimate``), which is the estimator's error against full scoring (``estimator_error``).

A kill mid-generation logs nothing of that generation, and the resumed run scores it again identically.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.evaluate.irt import AnchorEstimator
from evomerge.evaluate.lm_eval_scorer import ItemSubset
from evomerge.executor.worker import Outcome
from evomerge.genome.contract import Candidate
from evomerge.io.atomic import atomic_write_text
from evomerge.recipe.dataflow import DataFlowRecipe
from evomerge.recipe.recipe import Recipe
from evomerge.search.racing import ScoreItems
from evomerge.search.run_folder import RunFolder

FIT_FILE = "irt.json"
ESTIMATE_SUFFIX = "@estimate"


def endpoints(template: Recipe | DataFlowRecipe) -> list[str]:
    """The models an estimator is fitted on: the base (where the recipe has one) and every expert."""
    if isinstance(template, DataFlowRecipe):
        refs = list(template.sources)
    else:
        refs = ([template.base] if template.base is not None else []) + list(template.model_paths)
    return list(dict.fromkeys(str(ref) for ref in refs))


def fitted_estimator(
    run_dir: Path,
    template: Recipe | DataFlowRecipe,
    metric: str,
    *,
    anchors: int,
    dims: int,
    seed: int,
    refit: bool,
    score_models: Callable[[list[str], ItemSubset], Iterable[list[float]]],
) -> Fit:
    """The run's fit, from ``irt.json`` when an earlier start wrote it, else fitted now (and written).

    ``score_models``: the executor's, which scores each endpoint on the workers, placed as they place the
    candidates (``executor.gpus_per_worker``), so the driver needs neither a GPU nor room for a model."""
    path = run_dir / FIT_FILE
    if path.exists():
        return Fit.read(run_dir, n_anchors=anchors, dims=dims, seed=seed, refit=refit)
    models = endpoints(template)
    print(f"evomerge: estimated fitness: scoring {', '.join(models)} on every item of {metric}", flush=True)
    responses = []
    for values in score_models(models, ItemSubset(metric=metric)):
        responses.append(values)
        if anchors >= len(responses[0]):
            raise EvomergeError(
                f"estimate.anchors={anchors}, but {metric} has {len(responses[0])} items: scoring every candidate "
                "on that many anchors saves nothing",
                f"set estimate.anchors below {len(responses[0])} (tinyBenchmarks uses about 100 of 1,000+ items; "
                "on a task of ~100 items, 10 to 20), or estimate.enabled=false",
            )
    fit = Fit.of(responses, n_anchors=anchors, dims=dims, seed=seed, refit=refit, path=path)
    fit.record |= {"metric": metric, "models": models, "items_scored": sum(len(row) for row in responses)}
    fit.write()  # a kill while writing leaves no half file: the next start fits again
    return fit


class Fit:
    """The IRT model a generation's candidates are estimated with.

    It is fitted on the endpoints' full results, and with ``refit`` also on every candidate scored on every
    item since (each generation's best estimate), in the order they were scored: fitted again, anchors
    chosen again, after each. Those candidates cost no extra items, and unlike the endpoints they vary on
    the task: a merge's objective is often a skill no endpoint has, and a fit on endpoints that all fail
    the task cannot tell its items apart (results/fitness_cost_smollm.md). The fit is a deterministic
    function of its results, so a resumed run fits the same model from ``irt.json``.
    """

    def __init__(self, *, path: Path | None, record: dict, settings: dict, refit: bool) -> None:
        self.path = path
        self.record = record
        self.settings = settings
        self.refit = refit
        self.estimator = self._fitted()

    @classmethod
    def of(cls, responses, *, n_anchors: int, dims: int, seed: int, refit: bool, path: Path | None = None) -> Fit:
        """A fit on the endpoints' full results (a models x items list); ``write`` puts it at ``path``."""
        settings = {"n_anchors": n_anchors, "dims": dims, "seed": seed}
        state = AnchorEstimator.fit(responses, **settings).state()
        record = {"responses": [list(row) for row in responses], "estimator": state, "learned": []}
        return cls(path=path, record=record, settings=settings, refit=refit)

    @classmethod
    def read(cls, run_dir: Path, *, n_anchors: int, dims: int, seed: int, refit: bool) -> Fit:
        """The fit a run wrote (``irt.json``), less what it learned from candidates it never logged: a
        process killed in between, whose resumed run scores (and learns) that generation again."""
        path = run_dir / FIT_FILE
        record = json.loads(path.read_text())
        logged = {row["key"] for row in RunFolder(run_dir).read_evaluations() if not row["cached"]}
        record["learned"] = [entry for entry in record.get("learned", []) if entry["key"] in logged]
        return cls(path=path, record=record, settings={"n_anchors": n_anchors, "dims": dims, "seed": seed}, refit=refit)

    def learn(self, candidate: Candidate, values: list[float]) -> None:
        """A candidate's results on every item: with ``refit``, fitted again on them too (and written)."""
        if not self.refit:
            return
        self.record["learned"].append({"key": candidate.canonical(), "values": values})
        self.estimator = self._fitted()
        self.write()

    def write(self) -> None:
        if self.path is not None:
            atomic_write_text(self.path, json.dumps(self.record))

    def _fitted(self) -> AnchorEstimator:
        learned = [entry["values"] for entry in self.record["learned"]] if self.refit else []
        if not learned:
            return AnchorEstimator.from_state(self.record["estimator"])
        return AnchorEstimator.fit(self.record["responses"] + learned, **self.settings)


class Estimate:
    """The search loop's ``evaluate``: anchors for every candidate, every item for the generation's best
    estimate; yields the outcomes once the generation is done (see the module docstring)."""

    def __init__(self, *, score_items: ScoreItems, metric: str, fit: Fit, total: int) -> None:
        self.score_items = score_items
        self.metric = metric
        self.fit = fit
        self.total = total

    def __call__(self, recipes: list[Candidate]) -> Iterator[tuple[int, Outcome]]:
        estimator = self.fit.estimator
        anchors = tuple(int(i) for i in estimator.anchors)
        rest = tuple(sorted(set(range(self.total)) - set(anchors)))
        outcomes = dict(self.score_items(recipes, ItemSubset(metric=self.metric, positions=anchors)))
        estimates = {i: estimator.estimate(o.item_values) for i, o in outcomes.items() if o.item_values is not None}
        finished = {}
        if estimates:
            best = max(estimates, key=lambda i: (estimates[i], -i))  # the earliest of equal estimates
            ((_, others),) = self.score_items([recipes[best]], ItemSubset(metric=self.metric, positions=rest))
            if others.item_values is None:
                finished[best] = Outcome(
                    metrics=None, error=others.error, seconds=outcomes[best].seconds + others.seconds
                )
            else:
                values = [0.0] * self.total  # in item order, as the fit's responses are
                for position, value in zip(
                    anchors + rest, outcomes[best].item_values + others.item_values, strict=True
                ):
                    values[position] = value
                self.fit.learn(recipes[best], values)
                finished[best] = Outcome(
                    metrics={self.metric: sum(values) / len(values), self.metric + ESTIMATE_SUFFIX: estimates[best]},
                    error=None,
                    seconds=outcomes[best].seconds + others.seconds,
                    item_values=values,
                    items_total=others.items_total,
                )
        for i in range(len(recipes)):
            outcome = outcomes[i]
            if i in finished:
                yield i, finished[i]
            elif outcome.item_values is None:
                yield i, outcome  # it failed: logged and ranked worst as it came
            else:
                yield (
                    i,
                    Outcome(
                        metrics={self.metric: estimates[i]},
                        error=None,
                        seconds=outcome.seconds,
                        item_values=outcome.item_values,
                        items_total=outcome.items_total,
                    ),
                )


def estimator_error(rows: list[dict], metric: str) -> tuple[float, float, int] | None:
    """Mean and largest |estimate - accuracy on every item| over the rows scored both ways, and how many."""
    errors = [
        abs(row["metrics"][metric + ESTIMATE_SUFFIX] - row["metrics"][metric])
        for row in rows
        if row.get("metrics") and metric + ESTIMATE_SUFFIX in row["metrics"] and not row["cached"]
    ]
    if not errors:
        return None
    return sum(errors) / len(errors), max(errors), len(errors)


def describe_error(rows: list[dict], metric: str) -> str | None:
    error = estimator_error(rows, metric)
    if error is None:
        return None
    mean, largest, count = error
    return (
        f"estimated fitness: |IRT estimate - accuracy on every item| = {mean:.4f} on average, {largest:.4f} at most, "
        f"over the {count} candidates scored both ways"
    )
