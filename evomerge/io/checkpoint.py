"""A Hugging Face model folder, read lazily: tensors come off the weight files one at a time.

A model is named by a folder or a Hub ID (``evomerge/io/locate.py``). Its weights are safetensors,
or, when a folder has none, ``pytorch_model*.bin`` pickles read weights-only (``evomerge/io/pickled.py``).
A checkpoint no tensor-wise merge can use (quantized, multimodal) is refused when it is opened.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Iterable
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from evomerge.errors import EvomergeError
from evomerge.io.compatibility import check_mergeable
from evomerge.io.locate import (
    BIN_INDEX,
    BIN_SINGLE,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    ResolvedModel,
    resolve_model,
)
from evomerge.io.pickled import load_state_dict

INDEX_NAME = SAFETENSORS_INDEX
_LAYER = re.compile(r"\.layers\.(\d+)\.")
# A causal LM's head, which a tied model reads from its input embedding.
_HEAD = "lm_head.weight"

# The floating-point dtypes a merge averages, by safetensors' names. Anything else (I8, U8, I32, F8_E4M3,
# ...) is a quantized weight or a buffer, refused when the checkpoint is opened, never read as float32.
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def layer_index(tensor_name: str) -> int | None:
    """The decoder-layer number a tensor belongs to (``model.layers.3.mlp...`` → 3), else None."""
    match = _LAYER.search(tensor_name)
    return int(match.group(1)) if match else None


class Checkpoint:
    """One model folder: its config and a map from tensor name to the file that holds it."""

    def __init__(self, *, origin: ResolvedModel, config: dict) -> None:
        """Map ``origin``'s folder; ``open`` is the way in, which checks the folder and its tensors too."""
        self.origin = origin
        self.path = origin.path
        self.config = config
        self._handles: dict[Path, object] = {}
        self._pickles: dict[Path, dict[str, torch.Tensor]] = {}
        self._layouts: dict[Path, dict[str, tuple[torch.dtype, int, int]]] = {}
        self.shards = _shard_map(self.path, self._keys)

    @classmethod
    def open(cls, ref: str | Path) -> Checkpoint:
        """Open and validate a model folder or Hub ID; every problem becomes an ``EvomergeError``."""
        origin = resolve_model(ref)
        path = origin.path
        if not path.is_dir():
            raise EvomergeError(
                f"model folder '{path}' does not exist or is not a folder",
                "check the path in the recipe (relative paths are read from the current directory), "
                "or name a Hugging Face model as org/name",
            )
        config_file = path / "config.json"
        if not config_file.is_file():
            adapter = (path / "adapter_config.json").is_file()
            raise EvomergeError(
                f"'{path}' has no config.json, so it is not a Hugging Face model folder"
                + (" (its adapter_config.json makes it a PEFT/LoRA adapter)" if adapter else ""),
                "merge the adapter into its base model first (peft: merge_and_unload, then save_pretrained)"
                if adapter
                else "point to the folder that holds config.json and the *.safetensors files",
            )
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as error:
            raise EvomergeError(
                f"'{config_file}' is not valid JSON ({error})", "restore the file from the model's source"
            ) from error
        checkpoint = cls(origin=origin, config=config)
        checkpoint._validate_shards()
        stored = checkpoint._stored
        check_mergeable(
            ref=checkpoint.ref,
            config=config,
            names=checkpoint.names,
            non_float={name: dtype for name, (_, dtype) in stored.items() if dtype not in _DTYPES},
        )
        # A tie is what the config says, whatever the file stores: a .bin saved from a tied model's state
        # dict holds its head as an alias of the embedding, which transformers ties again on loading. Read
        # as a head of its own, it would untie the merge (and every tied source merged with it).
        if _HEAD in checkpoint.shards and ties_embeddings(config):
            del checkpoint.shards[_HEAD]
        return checkpoint

    @property
    def ref(self) -> str:
        """The model as a run should record it: the folder given, or ``org/name@<commit>`` for a Hub model."""
        return self.origin.pinned

    @property
    def revision(self) -> str | None:
        """The Hub commit the weights were read at; None for a local folder."""
        return self.origin.commit

    @property
    def names(self) -> list[str]:
        return list(self.shards)

    @property
    def num_layers(self) -> int:
        return int(self.config.get("num_hidden_layers", 0))

    @cached_property
    def _stored(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Shape and stored dtype name (safetensors' spelling) of every tensor, without reading its data."""
        stored = {}
        for name, file in self.shards.items():
            if file.suffix == ".bin":
                tensor = self._pickle(file)[name]
                dtype = _DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype).removeprefix("torch."))
                stored[name] = (tuple(tensor.shape), dtype)
            else:
                view = self._handle(file).get_slice(name)
                stored[name] = (tuple(view.get_shape()), view.get_dtype())
        return stored

    def shape(self, name: str) -> tuple[int, ...]:
        return self._stored[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._stored[name][1]]

    def load(self, name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor from its file onto ``device`` (cast to ``dtype`` after the read)."""
        file = self.shards[name]
        tensor = self._tensor(name)
        # A .bin tensor is a view of the file's memory map: the caller gets a tensor of its own, as from safetensors.
        return tensor.to(device=device, dtype=dtype or tensor.dtype, copy=file.suffix == ".bin")

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Copy one tensor into ``out`` (its shape; any dtype and device, cast on the way) and return ``out``.

        A contiguous CPU ``out`` of the stored dtype is filled by a positioned read from the shard, not
        through safetensors' memory map: every mapped page the copy touches stays in the process's resident
        set while the shard is open. Reading 24 Llama-7B MLP matrices (2 GiB of bfloat16, 8 per shard) into
        one buffer peaked at 340 MiB this way and at 1,028 MiB through ``safe_open``, in the same time
        (scripts/bench_reads.py, results/bench_reads.md); at 5 GB shards that is gigabytes per source.
        """
        file = self.shards[name]
        layout = self._layout(file)
        stored = layout.get(name)
        if stored is None or out.device.type != "cpu" or not out.is_contiguous() or out.dtype != stored[0]:
            return out.copy_(self._tensor(name))
        _, begin, end = stored
        target = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        if len(target) != end - begin:
            raise EvomergeError(
                f"tensor '{name}' in '{file}' holds {end - begin} bytes, {len(target)} expected from its shape",
                "the shard is corrupt: download or copy it again",
            )
        with file.open("rb", buffering=0) as handle:
            done = 0
            while done < len(target):
                count = os.preadv(handle.fileno(), [target[done:]], begin + done)
                if count == 0:
                    raise EvomergeError(
                        f"shard '{file}' ends inside tensor '{name}'", "download or copy that file again"
                    )
                done += count
        return out

    def _layout(self, file: Path) -> dict[str, tuple[torch.dtype, int, int]]:
        """Per tensor of a safetensors shard whose dtype torch reads as stored: (dtype, first byte, end byte)
        in the file. Empty for a .bin file: its tensors are copied out of its memory map instead."""
        if file not in self._layouts:
            self._layouts[file] = {} if file.suffix == ".bin" else _safetensors_layout(file)
        return self._layouts[file]

    def _keys(self, file: Path) -> list[str]:
        return list(self._pickle(file)) if file.suffix == ".bin" else _safetensors_keys(file)

    def _tensor(self, name: str) -> torch.Tensor:
        file = self.shards[name]
        return self._pickle(file)[name] if file.suffix == ".bin" else self._handle(file).get_tensor(name)

    def _pickle(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._pickles:
            self._pickles[file] = load_state_dict(file)
        return self._pickles[file]

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def _validate_shards(self) -> None:
        for file in sorted(set(self.shards.values())):
            if file.suffix == ".bin":
                present = set(self._pickle(file))
                self._check_named(file, present)
                continue
            try:
                present = set(self._handle(file).keys())
            except (SafetensorError, OSError) as error:
                raise EvomergeError(
                    f"shard '{file}' is truncated or corrupt ({error})",
                    "download or copy that file again; its size should match the source",
                ) from error
            self._check_named(file, present)

    def _check_named(self, file: Path, present: set[str]) -> None:
        missing = [name for name, f in self.shards.items() if f == file and name not in present]
        if missing:
            raise EvomergeError(
                f"the index of '{self.path}' places {len(missing)} tensors (e.g. '{missing[0]}') "
                f"in '{file.name}', which does not hold them",
                "the index and the shards come from different versions: fetch the folder again",
            )

    def __repr__(self) -> str:
        return f"Checkpoint('{self.ref}')"


def ties_embeddings(config: dict) -> bool:
    """Whether transformers ties the model's LM head to its input embedding: the config's
    ``tie_word_embeddings``, else its family's default (Gemma's true, Llama's false)."""
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(config.get("model_type", "")).tie_word_embeddings
    except ValueError:  # a family transformers does not know: it would not load the model to tie it either
        return False


def _shard_map(path: Path, keys: Callable[[Path], Iterable[str]]) -> dict[str, Path]:
    """Tensor name → file, from the weights transformers would read, in its order of preference:
    safetensors (an index, ``model.safetensors``, any ``*.safetensors``), then ``.bin`` (an index,
    ``pytorch_model.bin``). ``keys`` lists the tensors of a file that has no index."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = path / index_name
        if index.is_file() and (index_name == SAFETENSORS_INDEX or not any(path.glob("*.safetensors"))):
            return _indexed(path, index)
    files = [path / SAFETENSORS_SINGLE] if (path / SAFETENSORS_SINGLE).is_file() else sorted(path.glob("*.safetensors"))
    if not files and (path / BIN_SINGLE).is_file():
        files = [path / BIN_SINGLE]
    if not files:
        raise EvomergeError(
            f"'{path}' holds no weights evomerge reads (*.safetensors, or pytorch_model.bin and its shards)",
            "point to a folder with model weights in transformers' format",
        )
    return {name: file for file in files for name in keys(file)}


def _indexed(path: Path, index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise EvomergeError(
            f"'{index}' is not a valid weights index ({error})", "restore the file from the model's source"
        ) from error
    absent = sorted({f for f in weight_map.values() if not (path / f).is_file()})
    if absent:
        raise EvomergeError(
            f"'{path}' is missing shard file(s) named in its index: {', '.join(absent)}",
            "copy the missing shards into the folder",
        )
    return {name: path / file for name, file in weight_map.items()}


def _safetensors_layout(file: Path) -> dict[str, tuple[torch.dtype, int, int]]:
    """safetensors' layout: an 8-byte little-endian header length, the JSON header, then the data, with
    ``data_offsets`` relative to the data's start."""
    with file.open("rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    start = 8 + size
    return {
        name: (_DTYPES[entry["dtype"]], start + entry["data_offsets"][0], start + entry["data_offsets"][1])
        for name, entry in header.items()
        if name != "__metadata__" and entry["dtype"] in _DTYPES
    }


def _safetensors_keys(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as error:
        raise EvomergeError(
            f"shard '{file}' is truncated or corrupt ({error})",
            "download or copy that file again; its size should match the source",
        ) from error
