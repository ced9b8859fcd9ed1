"""What a person watching the run sees: a bar that advances per generation, then a summary table."""

from __future__ import annotations

import math

from tqdm.auto import tqdm

from evomerge.search.state import SearchState


class Progress:
    def __init__(self, *, objectives: list[str], budget: int | None, start: SearchState) -> None:
        self.objectives = objectives
        self._bar = tqdm(total=budget, initial=start.evaluations, unit="eval", desc="search", dynamic_ncols=True)

    def generation_done(self, state: SearchState) -> None:
        last = state.history[-1]
        self._bar.set_postfix_str(f"gen {last['generation']} best {last['best']:.4f} mean {last['mean']:.4f}")
        self._bar.update(state.evaluations - self._bar.n)

    def close(self, state: SearchState) -> None:
        self._bar.close()
        print(summary_table(state, self.objectives))


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
    if failed:
        lines += ["", f"first failure (evaluations.jsonl has each one's error): {failed[0].splitlines()[0]}"]
    if len(objectives) > 1 and state.front is not None:
        lines.append(f"\nPareto front: {len(state.front)} candidates (evomerge export RUN_DIR OUT --pareto)")
    return "\n".join(lines)
