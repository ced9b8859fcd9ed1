"""The evaluation cache's key: one line of YAML per distinct plain recipe, with sorted keys.

The search loop computes one key per candidate on the driver, between a generation's last result and
the next generation's first dispatch. PyYAML builds a node per value in Python before its C emitter
runs (0.6 ms for a 30-knob recipe); this writes the same line directly (0.05 ms). Strings and any
value this writer does not know go through PyYAML itself, memoized, so the quoting rules stay
PyYAML's; tests/test_recipe.py checks the two agree.
"""

from __future__ import annotations

import functools
import math

import yaml

# libyaml's dumper when PyYAML was built with it: the same bytes as the pure-Python one, 3x faster.
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def canonical_yaml(plain: dict) -> str:
    """``yaml.dump(plain, sort_keys=True, default_flow_style=True)`` for plain recipe data, faster."""
    try:
        return _flow(plain) + "\n"
    except _Unknown:
        return _yaml_flow(plain)


class _Unknown(Exception):
    """A value outside the plain-recipe types: the caller falls back to PyYAML for the whole line."""


def _yaml_flow(value: object) -> str:
    return yaml.dump(value, Dumper=_DUMPER, sort_keys=True, default_flow_style=True, width=1 << 30)


def _flow(value: object) -> str:
    # Exact types: a subclass (numpy's float64 is one of float) is PyYAML's to handle, or to refuse.
    kind = type(value)
    if kind is float:
        return _float(value)
    if kind is dict:
        return "{" + ", ".join(f"{_key(k)}: {_flow(value[k])}" for k in sorted(value)) + "}"
    if kind is list:
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    if kind is str:
        return _string(_printable(value))
    if value is None:
        return "null"
    raise _Unknown


def _float(value: float) -> str:
    text = repr(value)
    if not math.isfinite(value) or "e" in text:
        return _in_flow(value)  # .nan, .inf and PyYAML's exponent spelling (1.0e-05): rare, so PyYAML's
    return text


def _key(key: object) -> str:
    if type(key) is not str:
        raise _Unknown
    return _string_key(_printable(key))


def _printable(text: str) -> str:
    # PyYAML indents a line break by the depth it is written at, which one memoized spelling cannot know.
    if not text.isprintable():
        raise _Unknown
    return text


@functools.lru_cache(maxsize=4096)
def _string(value: str) -> str:
    return _in_flow(value)


@functools.lru_cache(maxsize=4096)
def _string_key(key: str) -> str:
    return _yaml_flow({key: None})[1 : -len(": null}\n")]


def _in_flow(value: object) -> str:
    """How PyYAML writes one scalar inside a flow collection (flow context decides the quoting)."""
    return _yaml_flow([value])[1:-2]
