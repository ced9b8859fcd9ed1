"""Can these checkpoints be merged tensor by tensor? Say exactly why not, before any work starts."""

from __future__ import annotations

from collections.abc import Sequence

from evomerge.errors import EvomergeError
from evomerge.io.checkpoint import Checkpoint

# Config keys that must agree for a tensor-wise merge to make sense; other keys (dropout, rope
# scaling, chat templates) may differ and the base model's values are kept.
_MUST_MATCH = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


def check_compatible(reference: Checkpoint, others: Sequence[Checkpoint]) -> None:
    """Raise an ``EvomergeError`` naming the first architecture, tensor-name or shape mismatch."""
    for other in others:
        for key in _MUST_MATCH:
            mine, theirs = reference.config.get(key), other.config.get(key)
            if mine != theirs:
                raise EvomergeError(
                    f"'{other.path}' has {key} = {theirs} but '{reference.path}' has {key} = {mine}, "
                    "so their tensors cannot be merged one to one",
                    "merge only models fine-tuned from the same base architecture "
                    "(data-flow-space merging can combine models with different layer counts)",
                )
        missing = sorted(set(reference.names) - set(other.names))
        extra = sorted(set(other.names) - set(reference.names))
        if missing or extra:
            example = missing[0] if missing else extra[0]
            raise EvomergeError(
                f"'{other.path}' and '{reference.path}' hold different tensors "
                f"({len(missing)} missing, {len(extra)} extra, e.g. '{example}')",
                "merge models of one architecture saved the same way (tied embeddings must match too)",
            )
        for name in reference.names:
            if reference.shape(name) != other.shape(name):
                raise EvomergeError(
                    f"tensor '{name}' has shape {list(other.shape(name))} in '{other.path}' but "
                    f"{list(reference.shape(name))} in '{reference.path}'",
                    "merge models with the same sizes (a resized vocabulary must be resized in all of them)",
                )
