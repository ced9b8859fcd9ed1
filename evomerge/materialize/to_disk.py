"""Merge a recipe into a new model folder, one tensor at a time (peak memory: one shard plus one tensor's inputs)."""

from __future__ import annotations

from pathlib import Path

import torch

from evomerge.errors import EvomergeError
from evomerge.io.atomic import atomic_folder, refuse_existing
from evomerge.io.writer import ShardedWriter, write_model_files
from evomerge.materialize.model_card import write_recipe_files
from evomerge.materialize.plan import method_kwargs, validate
from evomerge.materialize.sources import MergeSources
from evomerge.recipe.recipe import Recipe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvomergeError(
            f"device '{name}' was asked for but this machine has no CUDA GPU visible to torch",
            "use --device cpu, or install a CUDA build of torch on a machine with a GPU",
        )
    return device


def merge_to_disk(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    scores: dict[str, float] | None = None,
) -> Path:
    """Write the merged model to ``out_dir``; nothing appears there unless the whole merge succeeds."""
    out_dir = Path(out_dir)
    refuse_existing(out_dir, overwrite=overwrite)
    method = validate(recipe)
    sources = MergeSources.open(recipe, method)
    torch_device = resolve_device(device)
    reference = sources.reference
    first = reference.names[0]
    out_dtype = DTYPES[dtype or recipe.dtype] if (dtype or recipe.dtype) else reference.dtype(first)
    tokenizer_source = sources.reference.path if recipe.tokenizer_source is None else Path(recipe.tokenizer_source)
    with torch.no_grad(), atomic_folder(out_dir, overwrite=overwrite) as tmp:
        writer = ShardedWriter(folder=tmp, max_shard_bytes=max_shard_bytes)
        for name in reference.names:
            base, stacked = sources.inputs(method, name, device=torch_device, dtype=out_dtype)
            kwargs = method_kwargs(recipe, method, name, num_layers=reference.num_layers, device=torch_device)
            writer.add(name, method.fn(base, stacked, **kwargs).to(out_dtype))
        writer.finish()
        write_model_files(
            folder=tmp,
            config=reference.config,
            dtype=out_dtype,
            source=reference.path,
            tokenizer_source=tokenizer_source,
        )
        write_recipe_files(folder=tmp, recipe=recipe, scores=scores)
    return out_dir
