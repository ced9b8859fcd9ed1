"""Paired racing: a generation's candidates are scored on the same items in the same order, in rounds,
and a candidate stops being scored once more items cannot change what the race must settle.

**Items.** Rounds double: items ``[0, r)``, then ``[r, 3r)``, ``[3r, 7r)``, ... of an order of the raced
task drawn again for each generation from the run's seed (``ItemSubset.shuffle`` = (seed, generation)).
The candidates of a generation are chosen before its order is drawn, so for them any prefix of it is a
uniform sample drawn without replacement from the task's items; with one order for the whole run, later
generations would be chosen for doing well on the first round's items. The order depends on nothing but
(seed, generation), so a resumed run races a generation on the items the killed run raced it on.

**The bound.** After each round, every pair of candidates (i, j) is compared on the n items both saw: the
paired differences ``d_k = v_ik - v_jk`` lie in [-1, 1] for per-item metrics in [0, 1], and where two
merges of the same models mostly agree, most of them are 0. Let s be the mean of d^2 over every item of
the task (the share of items on which they differ, for 0/1 metrics) and s_n its mean over the n items.
With x = ln(3 / delta'), each of these holds with probability at least 1 - delta' / 3:

    s <= s_up = (sqrt(x / 2n) + sqrt(x / 2n + s_n))^2
        (solving s - s_n <= sqrt(2 s x / n): the lower tail of a mean of non-negative variables, whose
        second moment is at most their mean in [0, 1]; Maurer 2003, "A bound on the deviation probability
        for sums of non-negative random variables", Theorem 1)
    mean(d over the n items) - mean(d over every item) <= sqrt(2 var(d) x / n) + 2x / 3n, and the same
    for -d (Bernstein's inequality with d - mean(d) <= 2, in the form of Boucheron, Lugosi & Massart 2013,
    Theorem 2.10)

and var(d) <= s. Together, with probability at least 1 - delta':

    |mean(d over the n items) - mean(d over every item)| <= sqrt(2 s_up x / n) + 2x / 3n.

This is an empirical Bernstein bound in the manner of Audibert, Munos & Szepesvari (2009, Theorem 1: with
probability 1 - 3e^-x, the same shape with the sample variance and 3bx/n) and Maurer & Pontil (2009):
Bernstein's inequality with the variance bounded from the same sample. Every step bounds a moment
generating function, so it holds for sampling without replacement too (Hoeffding 1963, Theorem 4).
Bardenet & Maillard's empirical Bernstein-Serfling bound (2015, Bernoulli 21(3), Theorem 3: the variance
term sigma_n sqrt(2 rho_n ln(5/delta) / n) plus kappa (b - a) ln(5/delta) / n, kappa = 7/3 + 3/sqrt(2))
gains the finite-population factor rho_n but pays a range term 13x larger: with b - a = 2 it alone is as
wide as Hoeffding's whole bound at 496 of 1,000 items, so on tasks of 100-5,000 items it would stop
nothing Hoeffding does not.

Prefix lengths are round boundaries, so each pair is tested at most R times (R rounds): a union bound over
the K(K-1)/2 pairs and R rounds, delta' = delta / (K(K-1)/2 * R), makes every conclusion of the race hold
together with probability at least 1 - delta. "i surely beats j" means the bound's lower end for i - j is
above 0: i is better than j on the full item set.

**Who runs.** A candidate keeps being scored while either (a) whether it is among the optimizer's selected
top mu (CMA-ES's parents) is not settled: it surely beats fewer than K - mu candidates and surely loses to
fewer than mu; or (b) it can still be the generation's best: nobody surely beats it. So the generation's
best is always scored on every item. (If the race ends with no candidate scored on every item: every
candidate surely beaten, possible only where the bound failed, or optuna's pruner stopped them all, or the
ones left failed; then the one that saw the most items, the highest mean, the earliest, is scored on the
rest.) This is Maron & Moore's Hoeffding race (1994) with paired differences, as in F-Race (Birattari et
al. 2002).

**What the optimizer is told: one scale.** A candidate scored on every item is told its mean over them. A
stopped candidate is told an estimate of that mean: the reference's mean over every item plus the paired
difference on the items they share (the stopped candidate's n items), ``full(r) + mean_n(v_i - v_r)``:
its own mean over its items, corrected by how far the reference's mean over those items was from its mean
over every item. The reference is the candidate with the highest mean among those scored on every item
(the earliest of equal ones): the generation's best. Its log row keeps its own mean over its items as
``<metric>@prefix``, and ``items: [scored, total]`` marks it partial.

**Order guarantees.** pycma's active CMA-ES (on by default) weights the worst lambda - mu candidates
negatively by rank, so the whole told order counts, not only the top mu. Told on the prefix scale, a
stopped candidate would land at an arbitrary rank among the survivors (its items may be easier or harder
than the task). On the full scale:
- candidates scored on every item are told in their exact order;
- candidates stopped after the same round are told in the order of their means on the items they share
  (the reference's terms cancel);
- a stopped candidate is told below the reference whenever it did worse than the reference on its items,
  which includes every candidate the reference surely beat when it stopped;
- with probability at least 1 - delta, together with every conclusion of the race, each stopped
  candidate's estimate is within its pair's half-width with the reference (at its n items: a pair and
  round the union bound covers) of its mean over every item. Two candidates whose told values differ by
  more than the sum of their half-widths are told in their true order; closer ones may be swapped, which
  is the price of not scoring them. Rule (a) settles who is among the top mu with that probability, but a
  stopped member and a stopped non-member closer than their half-widths may still be told swapped.
An estimate is not clipped to the metric's range: clipping would tie the worst candidates, whose order
active CMA-ES reads.

With an optuna pruner (``optimizer.pruner``), the pruner decides instead: after each round every running
candidate's mean over its items is reported as the trial's intermediate value at step = items seen, and
the candidate stops when ``Trial.should_prune`` says so (``OptunaOptimizer.should_prune``). What is told
at the end is as above; the pruner gives no bound, so only the first three guarantees hold.
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
PREFIX_SUFFIX = "@prefix"  # a stopped candidate's own mean over the items it saw, kept beside its estimate


def half_width(n: int, second_moment: float, delta: float) -> float:
    """The empirical Bernstein bound (module docstring) on the mean of n paired differences in [-1, 1]
    whose squares average ``second_moment``, at confidence 1 - delta."""
    x = math.log(3.0 / delta)
    root = math.sqrt(x / (2 * n))
    bound_on_second_moment = min(1.0, (root + math.sqrt(root**2 + second_moment)) ** 2)
    return math.sqrt(2.0 * bound_on_second_moment * x / n) + 2.0 * x / (3 * n)


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
        differences = [a - b for a, b in zip(values[i][:n], values[j][:n], strict=True)]
        mean = sum(differences) / n
        bound = half_width(n, sum(d * d for d in differences) / n, pair_delta)
        if mean - bound > 0:
            beats[i], loses[j] = beats[i] + 1, loses[j] + 1
        elif mean + bound < 0:
            beats[j], loses[i] = beats[j] + 1, loses[i] + 1
    running = []
    for i in range(count):
        settled = selected is None or beats[i] >= count - selected or loses[i] >= selected
        running.append(len(values[i]) < total and (not settled or loses[i] == 0))
    return running


def full_scale(values: list[list[float]], total: int) -> list[float]:
    """What each candidate is told, from its per-item values (prefixes of one order; at least one holds all
    ``total`` items): its mean over every item, or the reference's plus the paired difference on its items."""
    full = [i for i, v in enumerate(values) if len(v) == total]
    reference = values[max(full, key=lambda i: (sum(values[i]), -i))]  # the best, the earliest of equals
    reference_mean = sum(reference) / total
    return [reference_mean + (sum(v) - sum(reference[: len(v)])) / len(v) for v in values]


class Race:
    """The search loop's ``evaluate``: races a generation and yields each candidate's outcome (what it is
    told, on the full scale, and how many items it saw) once the whole race is over, so a kill mid-race
    logs nothing of that generation and the resumed run races it again identically."""

    def __init__(
        self,
        *,
        score_items: ScoreItems,
        metric: str,
        first_round: int,
        delta: float,
        selected: int | None,
        seed: int,
        should_prune: ShouldPrune | None = None,
    ) -> None:
        self.score_items = score_items
        self.should_prune = should_prune
        self.metric = metric
        self.first_round = first_round
        self.delta = delta
        self.selected = selected
        self.seed = seed
        self.replays_whole_generations = should_prune is None  # optuna's trials must hear the rounds again

    whole_generation = True  # a killed generation is scored again, or replayed, only whole (loop.py)

    def __call__(
        self, recipes: list[Candidate], proposals: list[Proposal], *, generation: int
    ) -> Iterator[tuple[int, Outcome]]:
        values: list[list[float]] = [[] for _ in recipes]
        seconds = [0.0] * len(recipes)
        workers: list[str | None] = [None] * len(recipes)  # the last to score each one
        failed: dict[int, Outcome] = {}
        total = None

        def score(candidates: list[int], start: int, stop: int | None) -> None:
            nonlocal total
            subset = ItemSubset(metric=self.metric, start=start, stop=stop, shuffle=(self.seed, generation))
            for position, outcome in self.score_items([recipes[i] for i in candidates], subset):
                i = candidates[position]
                seconds[i] += outcome.seconds
                workers[i] = outcome.worker
                if outcome.item_values is None:
                    failed[i] = outcome
                else:
                    values[i] += outcome.item_values
                    total = outcome.items_total

        running, start, size = list(range(len(recipes))), 0, self.first_round
        while running:
            score(running, start, start + size)
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
        while total is not None:  # a reference for the stopped ones: see "Who runs" in the module docstring
            alive = [i for i in range(len(recipes)) if i not in failed]
            if not alive or any(len(values[i]) == total for i in alive):
                break
            leader = max(alive, key=lambda i: (len(values[i]), sum(values[i]) / len(values[i]), -i))
            score([leader], len(values[leader]), total)
        alive = [i for i in range(len(recipes)) if i not in failed]
        told = dict(zip(alive, full_scale([values[i] for i in alive], total), strict=True)) if alive else {}
        for i in range(len(recipes)):
            if i in failed:
                yield i, Outcome(metrics=None, error=failed[i].error, seconds=seconds[i], worker=workers[i])
                continue
            metrics = {self.metric: told[i]}
            if len(values[i]) < total:
                metrics[self.metric + PREFIX_SUFFIX] = sum(values[i]) / len(values[i])
            yield (
                i,
                Outcome(
                    metrics=metrics,
                    error=None,
                    seconds=seconds[i],
                    item_values=values[i],
                    items_total=total,
                    worker=workers[i],
                ),
            )
