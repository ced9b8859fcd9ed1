"""Write a mergekit ``slices:`` recipe as a model folder: each slice's layers copied or merged, then stacked.

A merged slice is the parameter-space machinery of ``to_disk`` run on its sources' layer ranges, each
read as a model of the slice's length (``layer_window``): so the method's per-tensor arguments come
from ``method_kwargs`` with a gradient over the slice's own layers, as in mergekit, and the reads go
through ``InputReader``. Embeddings are merged from the first slice's sources, the final norm and LM
head from the last slice's, each with that slice's settings. The config is the base model's (else the
first slice's first source's) with the stack's layer count, and each per-layer list (``layer_types``)
following its layers; mergekit 0.1.5 leaves such lists as they were, and without a base model takes
the config from whichever model its set of references yields first.

Where a name filter holds a layer number, it is matched against the slice's own numbering (mergekit:
the output's for global parameters, each source's for per-model ones).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from evomerge.dtypes import torch_dtype
from evomerge.errors import EvomergeError
from evomerge.io.atomic import atomic_folder, refuse_existing
from evomerge.io.checkpoint import Checkpoint, layer_index
from evomerge.io.locate import resolve_model
from evomerge.io.writer import ShardedWriter, write_model_files
from evomerge.materialize.dataflow import open_sources, per_layer_values, source_configs
from evomerge.materialize.model_card import MERGEKIT_NAME, RANDOM_MERGEKIT_SECTION, RECIPE_NAME, untied_note
from evomerge.materialize.plan import depth, method_kwargs, tensor_seed, validate
from evomerge.materialize.sources import EMBEDDING, HEAD, MergeSources, TiedHead
from evomerge.materialize.to_disk import InputReader, resolve_device
from evomerge.methods import get_method
from evomerge.recipe.dataflow import PathStep
from evomerge.recipe.recipe import Recipe
from evomerge.recipe.setting import Setting
from evomerge.recipe.slices import PASSTHROUGH, PASSTHROUGH_SCALE, SliceSource, SlicesRecipe


class RenamedTensors:
    """Some of a checkpoint's tensors under other names, read as ``Checkpoint`` reads its own."""

    def __init__(self, *, checkpoint: Checkpoint | TiedHead, stored: dict[str, str]) -> None:
        self.checkpoint = checkpoint
        self._stored = stored  # name here -> name in the checkpoint
        self.names = list(stored)

    @property
    def ref(self) -> str:
        return self.checkpoint.ref

    def stored(self, name: str) -> str:
        return self._stored[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.checkpoint.shape(self._stored[name])

    def dtype(self, name: str) -> torch.dtype:
        return self.checkpoint.dtype(self._stored[name])

    def load(self, name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.checkpoint.load(self._stored[name], device=device, dtype=dtype)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        return self.checkpoint.read_into(self._stored[name], out)


def renumbered(name: str, shift: int) -> str:
    """``model.layers.{i}.x`` as ``model.layers.{i + shift}.x``; other names as they are."""
    layer = layer_index(name)
    return name if layer is None else name.replace(f".layers.{layer}.", f".layers.{layer + shift}.", 1)


def layer_window(checkpoint: Checkpoint | TiedHead, start: int, stop: int) -> RenamedTensors:
    """Layers ``start`` to ``stop - 1`` as the layers 0 to ``stop - start - 1`` of a smaller model."""
    stored = {}
    for name in checkpoint.names:
        layer = layer_index(name)
        if layer is not None and start <= layer < stop:
            stored[renumbered(name, -start)] = name
    return RenamedTensors(checkpoint=checkpoint, stored=stored)


def outside_layers(checkpoint: Checkpoint | TiedHead, *, embedding: bool) -> RenamedTensors:
    """The embedding (mergekit's pre-layer weights), or the other tensors outside the layers (post-layer)."""
    names = [n for n in checkpoint.names if layer_index(n) is None and (n == EMBEDDING) == embedding]
    return RenamedTensors(checkpoint=checkpoint, stored={n: n for n in names})


@dataclass(frozen=True)
class Group:
    """Tensors written by one merge: a slice's layers, the embedding, or the final norm and head."""

    where: str
    sources: MergeSources
    recipe: Recipe | None  # None: passthrough, a copy of the one source (times ``scale`` where set)
    scale: Setting | None
    num_layers: int  # the group's layers, for the gradient position of each
    shift: int  # output layer of the group's layer 0


def write_slices_model(
    recipe: SlicesRecipe,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write the model ``recipe`` describes to ``out_dir``; nothing appears there unless all of it is written."""
    out_dir = Path(out_dir)
    refuse_existing(out_dir, overwrite=overwrite)
    if recipe.num_layers == 0:
        raise EvomergeError("the slices hold no decoder layers", "give at least one slice a non-empty layer_range")
    paths = recipe.model_paths
    opened = dict(zip(paths, open_sources(paths, role="stacked model"), strict=True))
    # Embeddings and head come from the first and last slices: the output is tied where all their sources
    # are (as mergekit's is), else a tied one's head is its embedding, as in a models-form merge (sources.py).
    ends = [src.model for piece in (recipe.slices[0], recipe.slices[-1]) for src in piece.sources]
    untied = any(HEAD in opened[path].names for path in ends)
    checkpoints = {p: TiedHead(c) if untied and HEAD not in c.names else c for p, c in opened.items()}
    for i, piece in enumerate(recipe.slices):
        for j, src in enumerate(piece.sources):
            count = checkpoints[src.model].num_layers
            if src.layer_range[1] > count:
                raise EvomergeError(
                    f"slices[{i}].sources[{j}]: layer_range {list(src.layer_range)} is out of range for "
                    f"'{src.model}', which has {count} layers (0 to {count - 1})",
                    f"use a layer_range [START, END] with END at most {count}",
                )
    donor = checkpoints[recipe.base or recipe.slices[0].sources[0].model]
    groups = plan_groups(recipe, checkpoints)
    config = dict(donor.config)
    config["num_hidden_layers"] = recipe.num_layers
    steps = [
        PathStep(source=paths.index(piece.sources[0].model), layer=piece.sources[0].layer_range[0] + i)
        for piece in recipe.slices
        for i in range(piece.length)
    ]
    config.update(per_layer_values(source_configs([opened[p].path for p in paths]), steps))
    _check_vocabulary(groups, donor, config)
    dtype = torch_dtype(recipe.dtype) if recipe.dtype else donor.dtype(donor.names[0])
    tokenizer = donor.path if recipe.tokenizer_source is None else resolve_model(recipe.tokenizer_source).path
    torch_device = resolve_device(device)
    with torch.no_grad(), atomic_folder(out_dir, overwrite=overwrite) as tmp:
        writer = ShardedWriter(folder=tmp, max_shard_bytes=max_shard_bytes)
        for group in groups:
            write_group(group, writer, device=torch_device, dtype=dtype)
        writer.finish()
        write_model_files(folder=tmp, config=config, dtype=dtype, source=donor.path, tokenizer_source=tokenizer)
        mergekit_yaml = yaml.safe_dump(recipe.to_mergekit(), sort_keys=False, default_flow_style=None)
        # The slices form is evomerge's recipe too: one text under both names, as a models-form merge has.
        (tmp / RECIPE_NAME).write_text(mergekit_yaml)
        (tmp / MERGEKIT_NAME).write_text(mergekit_yaml)
        # Only the sources of the last slice give the head: the card names the tied ones among them.
        tied = [v.ref for v in groups[-1].sources.all if isinstance(v.checkpoint, TiedHead)]
        (tmp / "README.md").write_text(_model_card(recipe, mergekit_yaml, tied))
    return out_dir


def plan_groups(recipe: SlicesRecipe, checkpoints: dict[str, Checkpoint | TiedHead]) -> list[Group]:
    """The embedding group, one group per slice, then the final norm and head; each checked before any is written."""
    first, last = recipe.slices[0], recipe.slices[-1]
    if len(last.sources) > len(first.sources):
        # mergekit 0.1.5 pairs the last slice's sources with as many input names as the first slice has
        # sources (plan_module zips the two), so it would merge only some of them into the norm and head.
        raise EvomergeError(
            f"the last slice has {len(last.sources)} sources and the first {len(first.sources)}: mergekit 0.1.5 "
            f"merges the final norm and LM head from only the first {len(first.sources)} of the last slice's sources",
            "give the last slice at most as many sources as the first (an empty slice, layer_range [N, N], "
            "of the models whose norm and head you want can close the stack)",
        )
    groups = [_group(recipe, 0, checkpoints, "embeddings", lambda c, src: outside_layers(c, embedding=True), 0)]
    shift = 0
    for i, piece in enumerate(recipe.slices):
        groups.append(
            _group(recipe, i, checkpoints, f"slices[{i}]", lambda c, src: layer_window(c, *src.layer_range), shift)
        )
        shift += piece.length
    last_index = len(recipe.slices) - 1
    groups.append(
        _group(
            recipe, last_index, checkpoints, "final norm and head", lambda c, s: outside_layers(c, embedding=False), 0
        )
    )
    return groups


def _group(
    recipe: SlicesRecipe,
    index: int,
    checkpoints: dict[str, Checkpoint | TiedHead],
    where: str,
    view: Callable[[Checkpoint | TiedHead, SliceSource], RenamedTensors],
    shift: int,
) -> Group:
    piece = recipe.slices[index]
    views = {src.model: view(checkpoints[src.model], src) for src in piece.sources}
    if recipe.method == PASSTHROUGH:
        (src,) = piece.sources
        settings = (src.parameters, piece.parameters, recipe.parameters)
        scale = next((s[PASSTHROUGH_SCALE] for s in settings if PASSTHROUGH_SCALE in s), None)
        sources = MergeSources(base=None, models=(views[src.model],))
        return Group(where=where, sources=sources, recipe=None, scale=scale, num_layers=piece.length, shift=shift)
    merge = recipe.slice_recipe(index)
    try:
        validate(merge)
    except EvomergeError as error:
        raise EvomergeError(f"{where} (slices[{index}]): {error.problem}", error.fix) from error
    base = views[merge.base] if merge.base is not None else None
    sources = MergeSources(base=base, models=tuple(views[entry.model] for entry in merge.models))
    _check_same_tensors(sources, where)
    return Group(where=where, sources=sources, recipe=merge, scale=None, num_layers=piece.length, shift=shift)


def _check_same_tensors(sources: MergeSources, where: str) -> None:
    reference = sources.reference
    for other in sources.all:
        missing = sorted(set(reference.names) ^ set(other.names))
        if missing:
            raise EvomergeError(
                f"{where}: '{other.ref}' and '{reference.ref}' hold different tensors there (e.g. '{missing[0]}')",
                "merge layers of models of one architecture, saved the same way",
            )
        for name in reference.names:
            if other.shape(name) != reference.shape(name):
                raise EvomergeError(
                    f"{where}: '{other.stored(name)}' has shape {list(other.shape(name))} in '{other.ref}' but "
                    f"'{reference.stored(name)}' has {list(reference.shape(name))} in '{reference.ref}'",
                    "merge layers of models of the same sizes",
                )


def _check_vocabulary(groups: list[Group], donor: Checkpoint | TiedHead, config: dict) -> None:
    """Embeddings and head come from the first and last slices, the config from another model: all must
    agree on the vocabulary, or the written model does not load."""
    for group in (groups[0], groups[-1]):
        reference = group.sources.reference
        for name in set(reference.names) & {EMBEDDING, HEAD}:
            rows = reference.shape(name)[0]
            if rows != config.get("vocab_size", rows):
                raise EvomergeError(
                    f"the output's '{name}' comes from '{reference.ref}' ({group.where}) with {rows} rows, but its "
                    f"config comes from '{donor.ref}', whose vocab_size is {config['vocab_size']}",
                    "take the first and last slices (embeddings; norm and head) and the base model from models "
                    "that share one vocabulary",
                )


def write_group(group: Group, writer: ShardedWriter, *, device: torch.device, dtype: torch.dtype) -> None:
    reference = group.sources.reference
    if group.recipe is None:
        for name in reference.names:
            tensor = reference.load(name, device=device, dtype=dtype)
            # mergekit reads a per-model knob by the source's own tensor name, at the slice's gradient position.
            factor = (
                None if group.scale is None else group.scale.at(reference.stored(name), depth(name, group.num_layers))
            )
            # A copy where unscaled: safetensors refuses two names on one storage, as a reused layer would give.
            writer.add(renumbered(name, group.shift), tensor.clone() if factor is None else tensor * factor)
        return
    method = get_method(group.recipe.method)
    reader = InputReader(sources=group.sources, method=method, device=device, dtype=dtype)
    for name in reference.names:
        out_name = renumbered(name, group.shift)
        base, stacked = reader.read(name)
        kwargs = method_kwargs(group.recipe, method, name, num_layers=group.num_layers, device=device)
        if method.random:  # seeded by the output's name: two slices' layer 0 draw different masks
            kwargs["generator"].manual_seed(tensor_seed(group.recipe.seed, out_name))
        merged = torch.empty(reference.shape(name), dtype=dtype, device=device)
        writer.add(out_name, method.merge(base, stacked, **kwargs, out=merged))


def _model_card(recipe: SlicesRecipe, mergekit_yaml: str, tied: list[str]) -> str:
    lines = ["---", "library_name: transformers", "tags: [merge, evomerge]", "---", "# Merged model", ""]
    lines += [
        f"Made by evomerge from a mergekit `slices:` config (`{recipe.method}`): {recipe.num_layers} decoder layers "
        f"stacked from these slices. `evomerge merge {RECIPE_NAME} OUT` makes it again.",
        "",
        "| output layers | sources (layers) |",
        "| --- | --- |",
    ]
    start = 0
    for piece in recipe.slices:
        sources = ", ".join(f"`{s.model}` [{s.layer_range[0]}, {s.layer_range[1]})" for s in piece.sources)
        lines.append(f"| [{start}, {start + piece.length}) | {sources} |")
        start += piece.length
    lines.append("")
    if tied:
        lines += [untied_note(tied), ""]
    random = recipe.method != PASSTHROUGH and get_method(recipe.method).random
    heading = RANDOM_MERGEKIT_SECTION if random else "## The same merge for mergekit"
    lines += [heading, "", "```yaml", mergekit_yaml.rstrip(), "```", ""]
    return "\n".join(lines)
