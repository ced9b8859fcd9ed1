"""Optimizers over merge-recipe search spaces, speaking pycma's ask/tell (see `base.py` for the contract).

The backends (`cmaes`, `optuna_sampler`, `random_search`) are imported from their modules, as the
`conf/optimizer/*.yaml` targets do, so importing the interface does not pull in cma or optuna.
"""

from evomerge.optimizer.base import FailurePenalty, Optimizer, Proposal
from evomerge.optimizer.pareto import FrontMember, ParetoFront, dominates
from evomerge.optimizer.space import BinaryDim, Dim, FloatDim, SearchSpace

__all__ = [
    "BinaryDim",
    "Dim",
    "FailurePenalty",
    "FloatDim",
    "FrontMember",
    "Optimizer",
    "ParetoFront",
    "Proposal",
    "SearchSpace",
    "dominates",
]
