"""What a person watching the run sees: a bar that advances per generation, one log line per candidate,
then a summary table; and the search's events handed on to its watchers.

A watcher (the heartbeat, the plots, each tracker) has ``start(state)``, ``candidate(row, state)`` (a row
just logged, replayed ones included), ``generation_done(state)`` and ``run_ended(state)``; the session
closes it whether the run ended or failed.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence

from tqdm.auto import tqdm

from evomerge.search.state import SearchState

log = logging.getLogger("evomerge.search")


class Progress:
    def __init__(
        self, *, objectives: list[str], budget: int | None, start: SearchState, watchers: Sequence = ()
    ) -> None:
        self.objectives = objectives
        self.watchers = list(watchers)
        self._bar = tqdm(total=budget, initial=start.evaluations, unit="eval", desc="search", dynamic_ncols=True)
        for watcher in self.watchers:
            watcher.start(start)

    def candidate(self, row: dict, state: SearchState) -> None:
        log.info(candidate_line(row, self.objectives))
        for watcher in self.watchers:
            watcher.candidate(row, state)

    def generation_done(self, state: SearchState) -> None:
        last = state.history[-1]
        self._bar.set_postfix_str(f"gen {last['generation']} best {last['best']:.4f} mean {last['mean']:.4f}")
        self._bar.update(state.evaluations - self._bar.n)
        for watcher in self.watchers:
            watcher.generation_done(state)

    def close(self, state: SearchState) -> None:
        self._bar.close()
        print(summary_table(state, self.objectives))
        for watcher in self.watchers:
            watcher.run_ended(state)


def key_prefix(key: str) -> str:
    """A short name for a candidate's canonical key (a long JSON text): the start of its SHA-1."""
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def candidate_line(row: dict, objectives: list[str]) -> str:
    """``#12 key 3f2a9c01d4 combined=0.4120 3.21 s worker node1:4242 items 64/200`` (one per candidate)."""
    scores = " ".join(
        f"{name}={'failed' if value is None else f'{value:.4f}'}"
        for name, value in zip(objectives, row["scores"], strict=True)
    )
    parts = [f"#{row['index']} key {key_prefix(row['key'])}", scores, f"{row['seconds']:.2f} s"]
    parts.append(f"worker {row.get('worker')}" if not row["cached"] else "cached")
    if "items" in row:
        parts.append(f"items {row['items'][0]}/{row['items'][1]}")
    if row["error"]:
        parts.append(f"error {row['error'].splitlines()[0]}")
    return " ".join(parts)


def summary_table(state: SearchState, objectives: list[str]) -> str:
    fresh = sum(1 for _ in state.cache)
    failed = [error for _, _, error, _ in state.cache.values() if error]
    partial = sum(1 for _, _, error, items in state.cache.values() if not error and items and items[0] < items[1])
    lines = [
        "",
        f"generations {state.generation} | evaluations {state.evaluations} ({fresh} distinct, "
        f"{len(failed)} failed"
        + (f", {partial} scored on part of the items: estimates, never results" if partial else "")
        + ") | "
        f"wall {state.elapsed_s:.1f} s | workers spent {state.evaluating_s:.1f} s scoring candidates "
        "(summed over workers: with a pool it exceeds the wall time)",
        "",
        "| objective | best |",
        "| --- | --- |",
    ]
    if state.best is not None:
        lines += [f"| {name} | {value:.4f} |" for name, value in zip(objectives, state.best.scores, strict=True)]
        lines += ["", "best candidate's metrics:"]
        lines += [f"  {k} = {v:.4f}" for k, v in sorted((state.best.metrics or {}).items()) if math.isfinite(v)]
    else:
        lines.append("| (no candidate succeeded) | - |")
    scored = {scores for scores, _, error, _ in state.cache.values() if not error}
    if len(scored) == 1 and fresh - len(failed) > 1:  # a flat landscape: CMA-ES then walks at random
        tie = ", ".join(f"{value:.4f}" for value in next(iter(scored)))
        lines += [
            "",
            f"every candidate scored {tie}: the search could not tell them apart. Score more items "
            "(tasks.limit), choose tasks the sources differ on, or for DFS start at a source's own path "
            "(genome.start=embedding_source)",
        ]
    if failed:
        lines += ["", f"first failure (evaluations.jsonl has each one's error): {failed[0].splitlines()[0]}"]
    if len(objectives) > 1 and state.front is not None:
        lines.append(f"\nPareto front: {len(state.front)} candidates (evomerge export RUN_DIR OUT --pareto)")
    return "\n".join(lines)
