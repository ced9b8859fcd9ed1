"""Paired racing: a generation's candidates are scored on the same items in the same order, in rounds,
and a candidate stops being scored once more items cannot change what the optimizer is told.

Rounds double: items ``[0, r)``, then ``[r, 3r)``, ``[3r, 7r)``, ... of one fixed shuffle of the raced
task (``LMEvalScorer.score_items``). After each round, every pair of candidates (i, j) is compared on the
items both saw, a prefix of n items: the paired differences ``d_k = v_ik - v_jk`` lie in [-1, 1] for
per-item metrics in [0, 1], and the prefix is a uniform sample drawn without replacement from the task's
items, so by Hoeffding's inequality (1963, Theorem 1 and Section 6 for sampling without replacement)

    |mean(d over the prefix) - mean(d over every item)| <= sqrt(2 ln(2 / delta') / n)

with probability at least 1 - delta'. Prefix lengths are round boundaries, so each pair is tested at most
R times (R rounds): a union bound over the K(K-1)/2 pairs and R rounds, delta' = delta / (K(K-1)/2 * R),
makes every conclusion of the race hold together with probability at least 1 - delta. "i surely beats j"
means the bound's lower end for i - j is above 0: i is better than j on the full item set.

A candidate keeps being scored while either (a) whether it is among the optimizer's selected top mu
(CMA-ES's parents) is not settled: it surely beats fewer than K - mu candidates and surely loses to fewer
than mu; or (b) it can still be the generation's best: nobody surely beats it. So the generation's best is
always scored on every item. The optimizer is told each candidate's mean over the items it saw.
This is Maron & Moore's Hoeffding race (1994) with paired differences, as in F-Race (Birattari et al. 2002).

With an optuna pruner (``optimizer.pruner``), the pruner decides instead: after each round every running
candidate's estimate is reported as the trial's intermediate value at step = items seen, and the candidate
stops when ``Trial.should_prune`` says so (``OptunaOptimizer.should_prune``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from itertools import combinations

from evomerge.evaluate.lm_eval_scorer import ItemSubset
from evomerge.executor.worker import Outcome
from evomerge.genome.contract import Candidate
from evomerge.optimizer.base import Proposal

ScoreItems = Callable[[list[Candidate], ItemSubset], Iterator[tuple[int, Outcome]]]
ShouldPrune = Callable[[Proposal, int, float], bool]  # (candidate, items seen, estimate) -> stop it


def half_width(n: int, delta: float) -> float:
    """Hoeffding's bound on the mean of n paired differences in [-1, 1], at confidence 1 - delta."""
    return math.sqrt(2.0 * math.log(2.0 / delta) / n)


def round_count(total: int, first_round: int) -> int:
    """Rounds of sizes first_round, 2 first_round, 4 first_round, ... until ``total`` items are covered."""
    rounds, covered, size = 0, 0, first_round
    while covered < total:
        covered, size, rounds = covered + size, size * 2, rounds + 1
    return rounds


def still_running(
    values: list[list[float]], *, total: int, selected: int | None, delta: float, rounds: int
) -> list[bool]:
    """Which candidates need more items, given each one's per-item values so far (prefixes of one order).
    ``selected``: the optimizer's top-mu size, or None when it selects no parents (then only (b) counts)."""
    count = len(values)
    pair_delta = delta / (max(1, count * (count - 1) // 2) * rounds)
    beats, loses = [0] * count, [0] * count
    for i, j in combinations(range(count), 2):
        n = min(len(values[i]), len(values[j]))
        if n == 0:
            continue
        mean = sum(a - b for a, b in zip(values[i][:n], values[j][:n], strict=True)) / n
        bound = half_width(n, pair_delta)
        if mean - bound > 0:
            beats[i], loses[j] = beats[i] + 1, loses[j] + 1
        elif mean + bound < 0:
            beats[j], loses[i] = beats[j] + 1, loses[i] + 1
    running = []
    for i in range(count):
        settled = selected is None or beats[i] >= count - selected or loses[i] >= selected
        running.append(len(values[i]) < total and (not settled or loses[i] == 0))
    return running


class Race:
    """The search loop's ``evaluate``: races a generation and yields each candidate's outcome (the raced
    metric's mean over the items it saw, and how many that was) once the whole race is over, so a kill
    mid-race logs nothing of that generation and the resumed run races it again identically."""

    def __init__(
        self,
        *,
        score_items: ScoreItems,
        metric: str,
        first_round: int,
        delta: float,
        selected: int | None,
        should_prune: ShouldPrune | None = None,
    ) -> None:
        self.score_items = score_items
        self.should_prune = should_prune
        self.metric = metric
        self.first_round = first_round
        self.delta = delta
        self.selected = selected

    whole_generation = True  # the loop replays a killed generation only whole (loop.py)

    def __call__(
        self, recipes: list[Candidate], proposals: list[Proposal], *, generation: int = 0
    ) -> Iterator[tuple[int, Outcome]]:
        values: list[list[float]] = [[] for _ in recipes]
        seconds = [0.0] * len(recipes)
        failed: dict[int, Outcome] = {}
        running, start, size, total = list(range(len(recipes))), 0, self.first_round, None
        while running:
            subset = ItemSubset(metric=self.metric, start=start, stop=start + size)
            for position, outcome in self.score_items([recipes[i] for i in running], subset):
                i = running[position]
                seconds[i] += outcome.seconds
                if outcome.item_values is None:
                    failed[i] = outcome
                else:
                    values[i] += outcome.item_values
                    total = outcome.items_total
            start, size = start + size, size * 2
            alive = [i for i in range(len(recipes)) if i not in failed]
            if total is None or start >= total:
                break
            if self.should_prune is not None:
                running = [
                    i
                    for i in alive
                    if len(values[i]) == start
                    and not self.should_prune(proposals[i], start, sum(values[i]) / len(values[i]))
                ]
                continue
            decision = still_running(
                [values[i] for i in alive],
                total=total,
                selected=self.selected,
                delta=self.delta,
                rounds=round_count(total, self.first_round),
            )
            running = [i for i, keep in zip(alive, decision, strict=True) if keep]
        for i in range(len(recipes)):
            if i in failed:
                yield i, Outcome(metrics=None, error=failed[i].error, seconds=seconds[i])
                continue
            mean = sum(values[i]) / len(values[i]) if values[i] else math.nan
            yield (
                i,
                Outcome(
                    metrics={self.metric: mean},
                    error=None,
                    seconds=seconds[i],
                    item_values=values[i],
                    items_total=total,
                ),
            )
