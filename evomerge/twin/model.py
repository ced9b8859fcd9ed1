"""Assemble a Twin model in memory from the shared weights, the exclusive factors and a router."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from evomerge.errors import EvomergeError
from evomerge.io.checkpoint import Checkpoint
from evomerge.twin.twin_modeling import TWIN_MODELS, TwinRouter, factor_key


def twin_class(model_type: str) -> type:
    if model_type not in TWIN_MODELS:
        raise EvomergeError(
            f"Twin-Merging has no modeling code for the '{model_type}' family",
            f"use a model of one of these families: {', '.join(sorted(TWIN_MODELS))}",
        )
    return TWIN_MODELS[model_type]


def assemble_twin(
    shared_dir: Path,
    factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
    vectors: dict[str, list[torch.Tensor]],
    router: TwinRouter,
) -> torch.nn.Module:
    """The Twin model: ``shared_dir``'s weights, with ``factors``, ``vectors`` and ``router`` routing each input."""
    config = json.loads((shared_dir / "config.json").read_text())
    model_class = twin_class(config["model_type"])
    for key in ("model_type", "architectures", "transformers_version"):
        config.pop(key, None)
    config.update(
        twin_num_experts=router.outer.out_features,
        twin_router_size=router.inner.out_features,
        twin_ranks={name: [u.shape[1] for u, _ in pairs] for name, pairs in factors.items()},
        twin_shapes={name: [pairs[0][0].shape[0], pairs[0][1].shape[1]] for name, pairs in factors.items()},
        twin_vector_shapes={name: list(deltas[0].shape) for name, deltas in vectors.items()},
    )
    model = model_class(model_class.config_class(**config))
    shared = Checkpoint.open(shared_dir)
    state = {name: shared.load(name) for name in shared.names}
    for name, pairs in factors.items():
        for expert, (u, v) in enumerate(pairs):
            state[f"twin_factors.{factor_key(expert, name, 'u')}"] = u
            state[f"twin_factors.{factor_key(expert, name, 'v')}"] = v
    for name, deltas in vectors.items():
        for expert, delta in enumerate(deltas):
            state[f"twin_factors.{factor_key(expert, name, 'd')}"] = delta
    state |= {f"twin_router.{name}": tensor for name, tensor in router.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise EvomergeError(
            f"the shared model's tensors do not fit the Twin model (missing {missing}, unexpected {unexpected})",
            "report this as a bug with the shared model's config.json",
        )
    dtype = shared.dtype(shared.names[0])
    model.to(dtype)
    model.twin_factors.float()
    return model.eval()
