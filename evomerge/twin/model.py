"""Assemble a Twin model in memory from the shared weights, the exclusive factors and a router."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers.utils import logging as transformers_logging

from evomerge.errors import EvomergeError
from evomerge.twin.exclusive import Factors, Vectors
from evomerge.twin.twin_modeling import TWIN_MODELS, factor_key


def twin_class(model_type: str) -> type:
    if model_type not in TWIN_MODELS:
        raise EvomergeError(
            f"Twin-Merging has no modeling code for the '{model_type}' family",
            f"use a model of one of these families: {', '.join(sorted(TWIN_MODELS))}",
        )
    return TWIN_MODELS[model_type]


def assemble_twin(
    shared_dir: Path, factors: Factors, vectors: Vectors, *, num_experts: int, router_size: int
) -> torch.nn.Module:
    """The Twin model: ``shared_dir``'s weights, with ``factors`` and ``vectors`` routed per input; its router
    is left as initialised, for the caller to train on this model's own features."""
    config = json.loads((shared_dir / "config.json").read_text())
    model_class = twin_class(config["model_type"])
    for key in ("model_type", "architectures", "transformers_version"):
        config.pop(key, None)
    config.update(
        twin_num_experts=num_experts,
        twin_router_size=router_size,
        twin_ranks={name: [u.shape[1] for u, _ in pairs] for name, pairs in factors.items()},
        twin_shapes={name: [pairs[0][0].shape[0], pairs[0][1].shape[1]] for name, pairs in factors.items()},
        twin_vector_shapes={name: list(deltas[0].shape) for name, deltas in vectors.items()},
    )
    # from_pretrained reads the shared weights straight into place (no random init, no second copy). It
    # reports the Twin parts as missing (set just below) and, quietly, anything else that does not fit.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        model, loading = model_class.from_pretrained(
            shared_dir, config=model_class.config_class(**config), output_loading_info=True
        )
    finally:
        transformers_logging.set_verbosity(verbosity)
    missing = {name for name in loading["missing_keys"] if not name.startswith(("twin_factors.", "twin_router."))}
    if missing or loading["unexpected_keys"]:
        raise EvomergeError(
            f"the shared model's tensors do not fit the Twin model (missing {sorted(missing)}, "
            f"unexpected {sorted(loading['unexpected_keys'])})",
            "report this as a bug with the shared model's config.json",
        )
    state = {}
    for name, pairs in factors.items():
        state[factor_key(name, "u")] = torch.cat([u for u, _ in pairs], dim=1)
        state[factor_key(name, "v")] = torch.cat([v for _, v in pairs], dim=0)
    for name, deltas in vectors.items():
        state[factor_key(name, "d")] = torch.stack(deltas)
    model.twin_factors.float().load_state_dict(state)
    return model.eval()
