"""Tiny real models built here, for tests and demos: a base, a language expert, a math expert, two models
that cannot be merged with them, and lm-eval tasks that score each skill."""

from evomerge.toy.world import ToyWorld, build_world, default_root

__all__ = ["ToyWorld", "build_world", "default_root"]
