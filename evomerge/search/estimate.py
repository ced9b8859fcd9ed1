"""Estimated fitness: each candidate is scored on a few anchor items of the objective's task, and its
accuracy on every item is estimated by item-response theory (evaluate/irt.py, tinyBenchmarks' gp-IRT).

At the start of a run, the base and every expert are scored on every item of the task, once; the IRT
model is fitted on those results (``irt.json`` keeps them, so a resumed run does not score them again).
The first ``estimate.warmup`` generations are scored on every item too, and fitted on (``Fit``).

In each later generation every candidate is scored on the anchors (``estimate.anchors`` items) and its
accuracy estimated; the generation's best estimate is then scored on the task's other items as well.
So every candidate that can become the run's best has been scored on every item (loop.py reports only
those), and each such row logs the estimate beside the real value (``<metric>@estimate``): the
estimator's error against full scoring (``estimator_error``). The optimizer is told one scale (``Estimate``).
With ``estimate.refit`` (the default) that best is fitted on too, at no cost in items. With
``estimate.verify_within`` set, that full scoring is skipped where it cannot pay: where the generation's
best estimate, calibrated by the last verified error, is more than ``verify_within`` below the best
accuracy scored so far (``Estimate``).

``estimate.estimator=mean`` needs no endpoints and no fit (``SampleMean``): each generation draws its own
random sample of ``estimate.anchors`` items (from the run's seed), every candidate of it is scored on
those, and its estimate is their mean (tinyBenchmarks' random-sampling baseline, unbiased); the
generation's best is scored on the other items as well, as above.

A kill mid-generation logs nothing of that generation, and a kill between two of its rows makes the
resumed run score it again whole (loop.py), identically.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
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
from evomerge.search.run_folder import RunFolder, fully_scored

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
    warmup: int,
    score_models: Callable[[list[str], ItemSubset], Iterable[list[float]]],
) -> Fit:
    """The run's fit, from ``irt.json`` when an earlier start wrote it, else fitted now (and written).

    ``score_models``: the executor's, which scores each endpoint on the workers, placed as they place the
    candidates (``executor.gpus_per_worker``), so the driver needs neither a GPU nor room for a model."""
    path = run_dir / FIT_FILE
    if path.exists():
        if json.loads(path.read_text()).get("estimator") == "mean":
            raise other_estimator(path, "mean")
        return Fit.read(run_dir, n_anchors=anchors, dims=dims, seed=seed, refit=refit, warmup=warmup)
    models = endpoints(template)
    print(f"evomerge: estimated fitness: scoring {', '.join(models)} on every item of {metric}", flush=True)
    responses = []
    for values in score_models(models, ItemSubset(metric=metric)):
        responses.append(values)
        if anchors >= len(responses[0]):
            raise too_many_anchors(anchors, metric, len(responses[0]))
    fit = Fit.of(responses, n_anchors=anchors, dims=dims, seed=seed, refit=refit, warmup=warmup, path=path)
    fit.record |= {"metric": metric, "models": models, "items_scored": sum(len(row) for row in responses)}
    fit.write()  # a kill while writing leaves no half file: the next start fits again
    return fit


def too_many_anchors(anchors: int, metric: str, total: int) -> EvomergeError:
    return EvomergeError(
        f"estimate.anchors={anchors}, but {metric} has {total} items: scoring every candidate on that many "
        "anchors saves nothing",
        f"set estimate.anchors below {total} (tinyBenchmarks uses about 100 of 1,000+ items; on a task of "
        "~100 items, 10 to 20), or estimate.enabled=false",
    )


def other_estimator(path: Path, wrote: str) -> EvomergeError:
    return EvomergeError(
        f"{path} was written by estimate.estimator={wrote}, and this run asks for the other estimator: its "
        "generations so far were estimated and verified that way",
        f"resume with estimate.estimator={wrote}, or start a new run folder",
    )


class Verified:
    """What every estimator keeps in the run folder (``irt.json``): each generation's best accuracy on every
    item and the estimate's error there, which ``Estimate`` calibrates later estimates with and
    ``estimate.verify_within`` compares them to. A resumed run reads it, and forgets what a generation it
    scores again had verified, so it decides as the killed run did."""

    def __init__(self, *, path: Path | None, record: dict, warmup: int = 0) -> None:
        self.path = path
        self.record = record
        self.warmup = warmup

    def forget_from(self, generation: int) -> None:
        """Drop what was verified from ``generation`` on: a killed run scores those generations again."""
        verified = self.record["verified"]
        still = [e for e in verified if e["generation"] < generation]
        if len(still) < len(verified):
            self.record["verified"] = still
            self.write()

    def verified(self, generation: int, accuracy: float, error: float | None) -> None:
        """A generation's best accuracy on every item and, where it was estimated first, the estimate's error
        (accuracy - estimate): what ``Estimate`` calibrates and compares later estimates with. Written at
        once, so a resumed run decides as the killed one did."""
        self.record["verified"].append({"generation": generation, "accuracy": accuracy, "error": error})
        self.write()

    def best_verified(self) -> tuple[float | None, float]:
        """The best accuracy on every item so far (None before any) and the latest estimate's error (0 before any)."""
        verified = self.record["verified"]
        errors = [e["error"] for e in verified if e["error"] is not None]
        return max((e["accuracy"] for e in verified), default=None), errors[-1] if errors else 0.0

    def learn(self, generation: int, candidates: list[Candidate], values: list[list[float]]) -> None:
        """Results on every item of candidates of ``generation``: nothing to learn without a fit."""

    def write(self) -> None:
        if self.path is not None:
            atomic_write_text(self.path, json.dumps(self.record))


class SampleMean(Verified):
    """``estimate.estimator=mean``: a candidate's estimate is its mean on a random sample of the task's items,
    drawn again for each generation (``ItemSubset.shuffle`` from the run's seed and the generation), the
    same for every candidate of it. No endpoints are scored and nothing is fitted; a fresh sample each
    generation keeps the search from adapting to one fixed subset's quirks, as ``tasks.limit`` lets it."""

    def __init__(self, *, path: Path | None, record: dict, anchors: int, seed: tuple[int, ...], warmup: int = 0):
        super().__init__(path=path, record=record, warmup=warmup)
        self.anchors = anchors
        self.seed = seed

    @classmethod
    def of(cls, run_dir: Path, *, anchors: int, seed: tuple[int, ...], warmup: int = 0) -> SampleMean:
        """The run's record (``irt.json``) where an earlier start wrote it, else a new one, written now."""
        path = run_dir / FIT_FILE
        record = json.loads(path.read_text()) if path.exists() else {"estimator": "mean", "items_scored": 0}
        if record.get("estimator") != "mean":
            raise other_estimator(path, "irt")
        record.setdefault("verified", [])
        sample = cls(path=path, record=record, anchors=anchors, seed=seed, warmup=warmup)
        sample.write()
        return sample

    def subsets(self, generation: int, metric: str) -> tuple[ItemSubset, ItemSubset, Callable[[list[float]], float]]:
        """This generation's sample, the task's other items, and the estimate: the sample's mean."""
        draw = (*self.seed, generation)
        rest = ItemSubset(metric=metric, start=self.anchors, shuffle=draw)
        return ItemSubset(metric=metric, stop=self.anchors, shuffle=draw), rest, statistics.fmean


class Fit(Verified):
    """The IRT models a run's generations are estimated with.

    The first is fitted on the endpoints' full results. ``warmup`` generations are then scored on every
    item and fitted on too, because a merge's objective is often a skill no endpoint has, and endpoints
    that all fail a task cannot tell its items apart (results/fitness_cost_smollm.md). With ``refit``, so
    is each later generation's best estimate, which is scored on every item anyway.

    A refit is off the critical path: generation g is estimated with the fit on what generations up to
    g - 2 taught (and the warmup), so the fit that adds generation g - 1's best runs on a thread while
    generation g is scored, and the workers never wait for it. Each fit is a function of the results it
    is fitted on (``AnchorEstimator.fit`` starts from the endpoints' fit), so a resumed run, which fits
    again what it needs, estimates with the same models.
    """

    def __init__(self, *, path: Path | None, record: dict, settings: dict, refit: bool, warmup: int = 0) -> None:
        super().__init__(path=path, record=record, warmup=warmup)
        self.settings = settings
        self.refit = refit
        self._fits: dict[int, Future] = {}  # by how many learned results each was fitted on
        self._thread = ThreadPoolExecutor(max_workers=1)

    @classmethod
    def of(
        cls, responses, *, n_anchors: int, dims: int, seed: int, refit: bool, warmup: int = 0, path: Path | None = None
    ) -> Fit:
        """A fit on the endpoints' full results (a models x items list); ``write`` puts it at ``path``."""
        settings = {"n_anchors": n_anchors, "dims": dims, "seed": seed}
        state = AnchorEstimator.fit(responses, **settings).state()
        record = {"responses": [list(row) for row in responses], "estimator": state, "learned": [], "verified": []}
        return cls(path=path, record=record, settings=settings, refit=refit, warmup=warmup)

    @classmethod
    def read(cls, run_dir: Path, *, n_anchors: int, dims: int, seed: int, refit: bool, warmup: int = 0) -> Fit:
        """The fit a run wrote (``irt.json``). What it learned from a generation the resumed run scores
        again is forgotten then (``forget_from``)."""
        record = json.loads((run_dir / FIT_FILE).read_text())
        # A run folder from before the learned results carried their generation: the log's rows give it.
        generations = {row["key"]: row["generation"] for row in RunFolder(run_dir).read_evaluations()}
        learned = record.get("learned", [])
        record["learned"] = [
            entry if "generation" in entry else entry | {"generation": generations[entry["key"]]}
            for entry in learned
            if "generation" in entry or entry["key"] in generations
        ]
        record.setdefault("verified", [])  # an irt.json written before verify_within has none
        settings = {"n_anchors": n_anchors, "dims": dims, "seed": seed}
        return cls(path=run_dir / FIT_FILE, record=record, settings=settings, refit=refit, warmup=warmup)

    @property
    def estimator(self) -> AnchorEstimator:
        """The latest fit: on the endpoints and every result learned so far."""
        return self._fitted(len(self.record["learned"]))

    def estimator_for(self, generation: int) -> AnchorEstimator:
        """The fit generation ``generation`` is estimated with (see the class docstring)."""
        learned = self.record["learned"]
        included = sum(1 for e in learned if e["generation"] < self.warmup or e["generation"] <= generation - 2)
        return self._fitted(included)

    def subsets(self, generation: int, metric: str) -> tuple[ItemSubset, ItemSubset, Callable[[list[float]], float]]:
        """The anchors of the fit this generation is estimated with, the task's other items, and the estimate."""
        estimator = self.estimator_for(generation)
        anchors = tuple(int(i) for i in estimator.anchors)
        rest = tuple(sorted(set(range(len(self.record["responses"][0]))) - set(anchors)))
        return (
            ItemSubset(metric=metric, positions=anchors),
            ItemSubset(metric=metric, positions=rest),
            estimator.estimate,
        )

    def forget_from(self, generation: int) -> None:
        """Drop what was learned and verified from ``generation`` on: a killed run scores those generations again."""
        learned = self.record["learned"]
        kept = [e for e in learned if e["generation"] < generation]
        if len(kept) < len(learned):
            self.record["learned"] = kept
            self._fits = {n: fit for n, fit in self._fits.items() if n <= len(kept)}
            self.write()
        super().forget_from(generation)

    def learn(self, generation: int, candidates: list[Candidate], values: list[list[float]]) -> None:
        """Results on every item (in item order) of candidates of ``generation``: kept (and written) to fit
        on, where this generation is a warmup one or ``refit`` is on; the next fit starts on a thread."""
        if not (generation < self.warmup or self.refit):
            return
        for candidate, row in zip(candidates, values, strict=True):
            self.record["learned"].append({"key": candidate.canonical(), "generation": generation, "values": row})
        self.write()
        if generation >= self.warmup:
            self._fitted(len(self.record["learned"]), wait=False)

    def _fitted(self, count: int, *, wait: bool = True) -> AnchorEstimator | None:
        if count not in self._fits:
            self._fits[count] = self._thread.submit(self._fit_on, count)
        return self._fits[count].result() if wait else None

    def _fit_on(self, count: int) -> AnchorEstimator:
        endpoints = AnchorEstimator.from_state(self.record["estimator"])
        if count == 0:
            return endpoints
        learned = [entry["values"] for entry in self.record["learned"][:count]]
        return AnchorEstimator.fit(self.record["responses"] + learned, **self.settings, start=endpoints)


class Estimate:
    """The search loop's ``evaluate``: anchors for every candidate, every item for the generation's best
    estimate (every item for every candidate in a warmup generation); yields the outcomes once the
    generation is done (see the module docstring).

    What the optimizer is told is on one scale: the generation's best is scored on every item, and the
    others are told their estimates shifted by its error (its accuracy minus its estimate). The order is
    the estimates' order, the verified best stays on top, and every value is a calibrated estimate of
    the task's accuracy. Their rows log the unshifted estimate beside it (``<metric>@estimate``)."""

    whole_generation = True  # a killed generation is scored again, or replayed, only whole (loop.py)
    replays_whole_generations = True

    def __init__(
        self, *, score_items: ScoreItems, metric: str, fit: Fit | SampleMean, verify_within: float | None = None
    ) -> None:
        self.score_items = score_items
        self.metric = metric
        self.fit = fit
        self.verify_within = verify_within

    def __call__(
        self, recipes: list[Candidate], proposals: object = None, *, generation: int
    ) -> Iterator[tuple[int, Outcome]]:
        self.fit.forget_from(generation)  # what a killed run learned from this generation is learned again
        if generation < self.fit.warmup:
            yield from self._every_item(recipes, generation)
            return
        anchors, rest, estimate_of = self.fit.subsets(generation, self.metric)
        outcomes = dict(self.score_items(recipes, anchors))
        asked = len(anchors.positions) if anchors.positions is not None else anchors.stop
        for outcome in outcomes.values():  # the mean's sample is drawn without knowing the task's size
            if outcome.item_values is not None and asked >= outcome.items_total:
                raise too_many_anchors(asked, self.metric, outcome.items_total)
        estimates = {i: estimate_of(o.item_values) for i, o in outcomes.items() if o.item_values is not None}
        best_so_far, shift = self.fit.best_verified()
        finished = {}
        best = max(estimates, key=lambda i: (estimates[i], -i)) if estimates else None  # the earliest of equals
        if best is not None and not self._worth_verifying(estimates[best] + shift, best_so_far):
            print(
                f"evomerge: estimated fitness: generation {generation}'s best estimate, {estimates[best] + shift:.4f} "
                f"calibrated, is more than estimate.verify_within={self.verify_within} below the best so far "
                f"({best_so_far:.4f}): not scored on every item",
                flush=True,
            )
            best = None
        if best is not None:
            ((_, others),) = self.score_items([recipes[best]], rest)
            seconds = outcomes[best].seconds + others.seconds
            if others.item_values is None:
                finished[best] = Outcome(metrics=None, error=others.error, seconds=seconds, worker=others.worker)
            else:
                total = others.items_total
                values = [0.0] * total  # in item order, as the fit's responses are
                for position, value in zip(
                    anchors.positions_in(total) + rest.positions_in(total),
                    outcomes[best].item_values + others.item_values,
                    strict=True,
                ):
                    values[position] = value
                self.fit.learn(generation, [recipes[best]], [values])
                accuracy = sum(values) / len(values)
                shift = accuracy - estimates[best]
                self.fit.verified(generation, accuracy, shift)
                finished[best] = Outcome(
                    metrics={self.metric: accuracy, self.metric + ESTIMATE_SUFFIX: estimates[best]},
                    error=None,
                    seconds=seconds,
                    item_values=values,
                    items_total=others.items_total,
                    worker=others.worker,
                )
        for i in range(len(recipes)):
            outcome = outcomes[i]
            if i in finished:
                yield i, finished[i]
            elif outcome.item_values is None:
                yield i, outcome  # it failed: logged and ranked worst as it came
            else:
                metrics = {self.metric: estimates[i] + shift, self.metric + ESTIMATE_SUFFIX: estimates[i]}
                yield i, replace(outcome, metrics=metrics)

    def _worth_verifying(self, calibrated: float, best_so_far: float | None) -> bool:
        """Whether the generation's best estimate is scored on every item: always, unless ``verify_within``
        is set and its calibrated estimate is further than that below the best accuracy so far."""
        if self.verify_within is None or best_so_far is None:
            return True
        return calibrated >= best_so_far - self.verify_within

    def _every_item(self, recipes: list[Candidate], generation: int) -> Iterator[tuple[int, Outcome]]:
        """A warmup generation: every candidate on every item, each learned by the fit."""
        outcomes = dict(self.score_items(recipes, ItemSubset(metric=self.metric)))
        scored = [i for i in range(len(recipes)) if outcomes[i].item_values is not None]
        self.fit.learn(generation, [recipes[i] for i in scored], [outcomes[i].item_values for i in scored])
        if scored:
            accuracies = [sum(outcomes[i].item_values) / len(outcomes[i].item_values) for i in scored]
            self.fit.verified(generation, max(accuracies), None)
        for i in range(len(recipes)):
            outcome = outcomes[i]
            if outcome.item_values is None:
                yield i, outcome
            else:
                yield i, replace(outcome, metrics={self.metric: sum(outcome.item_values) / len(outcome.item_values)})


def estimator_error(rows: list[dict], metric: str) -> tuple[float, float, int] | None:
    """Mean and largest |estimate - accuracy on every item| over the rows scored both ways, and how many."""
    errors = [
        abs(row["metrics"][metric + ESTIMATE_SUFFIX] - row["metrics"][metric])
        for row in rows
        if row.get("metrics") and metric + ESTIMATE_SUFFIX in row["metrics"] and not row["cached"] and fully_scored(row)
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
        f"estimated fitness: |estimate - accuracy on every item| = {mean:.4f} on average, {largest:.4f} at most, "
        f"over the {count} candidates scored both ways"
    )
