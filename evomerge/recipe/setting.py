"""A parameter's value in a recipe: one number, a gradient across layers, or values by tensor-name filter.

Semantics follow mergekit 0.1.5 (``config.py::evaluate_setting`` and ``plan.py::plan_slice``) so the
same YAML means the same merge in both tools:
- a gradient ``[v0, ..., vk]`` is interpolated linearly at ``t = layer / (num_layers - 1)`` (``t = 1``
  for a one-layer model); tensors outside the decoder layers (embeddings, final norm, LM head) use t = 0;
- filtered values are tried in order and the first whose filter is a substring of the tensor name
  wins; a rule without a filter (``default``) matches everything.
"""

from __future__ import annotations

from dataclasses import dataclass

from evomerge.errors import EvomergeError

Scalar = float | bool


@dataclass(frozen=True)
class Rule:
    filter: str | None
    values: tuple[Scalar, ...]


@dataclass(frozen=True)
class Setting:
    rules: tuple[Rule, ...]

    @classmethod
    def gradient(cls, values: list[float] | tuple[float, ...]) -> Setting:
        return cls(rules=(Rule(filter=None, values=tuple(values)),))

    def at(self, tensor_name: str, t: float) -> Scalar | None:
        """The value for one tensor at relative depth ``t``; None when no rule matches."""
        for rule in self.rules:
            if rule.filter is None or rule.filter == "*" or rule.filter in tensor_name:
                return _interpolate(rule.values, t)
        return None

    def scalars(self) -> list[Scalar]:
        """Every number the setting holds (for range checks)."""
        return [v for rule in self.rules for v in rule.values]

    # YAML forms: 0.5 | [0.1, 0.9] | {self_attn: 0.3, mlp: [0.1, 0.5], default: 0.2}
    def to_plain(self) -> Scalar | list[Scalar] | dict[str, Scalar | list[Scalar]]:
        if len(self.rules) == 1 and self.rules[0].filter is None:
            return _plain_values(self.rules[0].values)
        return {rule.filter or "default": _plain_values(rule.values) for rule in self.rules}

    @classmethod
    def from_plain(cls, value: object, *, where: str) -> Setting:
        if isinstance(value, dict):
            rules = [
                Rule(None if k == "default" else str(k), _values(v, where=f"{where}.{k}")) for k, v in value.items()
            ]
            # The default rule matches everything, so it must be tried last whatever the YAML order.
            rules.sort(key=lambda rule: rule.filter is None)
            return cls(rules=tuple(rules))
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            # mergekit's form: [{filter: self_attn, value: 0.3}, {value: 0.2}]
            rules = []
            for entry in value:
                if "value" not in entry:
                    raise EvomergeError(f"{where}: filter entry {entry} has no 'value'", "add 'value: <number>'")
                rules.append(Rule(entry.get("filter"), _values(entry["value"], where=where)))
            return cls(rules=tuple(rules))
        return cls(rules=(Rule(None, _values(value, where=where)),))

    def to_mergekit(self) -> Scalar | list[Scalar] | list[dict]:
        if len(self.rules) == 1 and self.rules[0].filter is None:
            return _plain_values(self.rules[0].values)
        out = []
        for rule in self.rules:
            entry: dict = {"filter": rule.filter} if rule.filter is not None else {}
            entry["value"] = _plain_values(rule.values)
            out.append(entry)
        return out


def _interpolate(values: tuple[Scalar, ...], t: float) -> Scalar:
    if len(values) == 1:
        return values[0]
    if any(isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def _values(value: object, *, where: str) -> tuple[Scalar, ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise EvomergeError(f"{where}: an empty list is not a value", "give a number or a non-empty list of numbers")
    out: list[Scalar] = []
    for item in items:
        if isinstance(item, bool):
            out.append(item)
        elif isinstance(item, (int, float)):
            out.append(float(item))
        elif isinstance(item, str):
            try:
                out.append(float(item))  # YAML reads 1e-3 without a dot as a string
            except ValueError:
                raise EvomergeError(
                    f"{where}: '{item}' is not a number", "give a number, true/false, or a list"
                ) from None
        else:
            raise EvomergeError(f"{where}: {item!r} is not a number", "give a number, true/false, or a list of numbers")
    return tuple(out)


def _plain_values(values: tuple[Scalar, ...]) -> Scalar | list[Scalar]:
    return values[0] if len(values) == 1 else list(values)
