"""What a search checkpoints after every generation: enough to continue as if it had never stopped."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from evomerge.optimizer.pareto import ParetoFront


@dataclass
class Best:
    index: int  # row of evaluations.jsonl
    recipe: dict
    scores: tuple[float, ...]
    metrics: dict[str, float]


@dataclass
class SearchState:
    optimizer: dict[str, Any]  # the optimizer's state_dict
    generation: int = 0
    evaluations: int = 0  # rows of evaluations.jsonl this state accounts for
    elapsed_s: float = 0.0  # wall time spent by all processes that drove the run
    evaluating_s: float = 0.0  # of which workers spent materializing and scoring candidates
    # key -> (scores, metrics, error, items) of each distinct candidate (items: [scored, in the task] when
    # raced, else None); not in checkpoint.pkl (the log rebuilds it)
    cache: dict[str, tuple[tuple[float, ...], dict[str, float] | None, str | None, list[int] | None]] = field(
        default_factory=dict
    )
    best: Best | None = None
    front: ParetoFront | None = None
    history: list[dict[str, float]] = field(default_factory=list)  # per generation: best, mean
