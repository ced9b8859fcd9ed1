"""Merge a recipe into a new model folder, one tensor at a time (peak memory: one shard plus one tensor's inputs)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from evomerge.dtypes import torch_dtype
from evomerge.errors import EvomergeError
from evomerge.io.atomic import atomic_folder, refuse_existing
from evomerge.io.writer import ShardedWriter, write_model_files
from evomerge.materialize.model_card import write_recipe_files
from evomerge.materialize.plan import method_kwargs, validate
from evomerge.materialize.sources import MergeSources
from evomerge.methods import MergeMethod
from evomerge.recipe.recipe import Recipe


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
    out_dtype = torch_dtype(dtype or recipe.dtype) if (dtype or recipe.dtype) else reference.dtype(first)
    with torch.no_grad(), atomic_folder(out_dir, overwrite=overwrite) as tmp, tempfile.TemporaryDirectory() as built:
        writer = ShardedWriter(folder=tmp, max_shard_bytes=max_shard_bytes)
        reader = InputReader(sources=sources, method=method, device=torch_device, dtype=out_dtype)
        for name in reference.names:
            base, stacked = reader.read(name)
            kwargs = method_kwargs(recipe, method, name, num_layers=reference.num_layers, device=torch_device)
            # The inputs' buffers are refilled for the next tensor: the result must be a tensor of its own.
            merged = torch.empty(sources.shape(name), dtype=out_dtype, device=torch_device)
            writer.add(name, method.merge(base, stacked, **kwargs, out=merged))
        writer.finish()
        write_model_files(
            folder=tmp,
            config=sources.config,
            dtype=out_dtype,
            source=reference.path,
            tokenizer_source=tokenizer_folder(sources, Path(built)),
        )
        write_recipe_files(folder=tmp, recipe=recipe, scores=scores, tied=sources.tied)
    return out_dir


def tokenizer_folder(sources: MergeSources, scratch: Path) -> Path:
    """The folder whose tokenizer files the output copies; a union vocabulary's tokenizer is saved to ``scratch``."""
    if sources.vocabulary is None:
        return sources.reference.path
    return sources.vocabulary.save_tokenizer(scratch)


class InputReader:
    """``MergeSources.inputs`` for a merge that is done with one tensor's inputs before it reads the
    next: every tensor is read into views of two buffers sized for the largest.

    A fresh tensor per read is a fresh mapping from the OS, and its first touch faults page by page:
    on the merge bench's 53M-parameter models that cost more than copying the bytes (0.33 s against
    0.13 s to read two models' tensors).
    """

    def __init__(self, *, sources: MergeSources, method: MergeMethod, device: torch.device, dtype: torch.dtype) -> None:
        self.sources = sources
        self.method = method
        largest = max(math.prod(sources.shape(name)) for name in sources.reference.names)
        self._base = torch.empty(largest if sources.base is not None else 0, dtype=dtype, device=device)
        self._stacked = torch.empty(len(sources.models) * largest, dtype=dtype, device=device)

    def read(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(base, stacked)`` for ``name``, as ``MergeSources.inputs`` gives them, valid until the next call."""
        shape = self.sources.shape(name)
        numel, count = math.prod(shape), len(self.sources.models)
        has_base = self.sources.base is not None
        base = self._base[:numel].view(shape) if has_base else None
        stacked = self._stacked[: count * numel].view(count, *shape)
        targets = ([base] if has_base else []) + list(stacked)
        if self.sources.remaps(name):
            # Rows move between vocabularies; these tensors are read whole, once per merge.
            remapped = self.sources.remapped(name, device=stacked.device, dtype=stacked.dtype)
            for target, tensor in zip(targets, remapped, strict=True):
                target.copy_(tensor)
        else:
            for checkpoint, target in zip(self.sources.all, targets, strict=True):
                checkpoint.read_into(name, target)
        if self.method.inputs == "deltas":
            stacked.sub_(base)
        return base, stacked
