"""A Hugging Face model folder, read lazily: tensors come off the safetensors files one at a time.

Only safetensors are read. ``.bin`` checkpoints are pickles that can run arbitrary code when loaded,
so a folder holding only those is refused with the one-line conversion a user needs.
"""

from __future__ import annotations

import json
import os
import re
import struct
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from evomerge.errors import EvomergeError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_LAYER = re.compile(r"\.layers\.(\d+)\.")

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def layer_index(tensor_name: str) -> int | None:
    """The decoder-layer number a tensor belongs to (``model.layers.3.mlp...`` → 3), else None."""
    match = _LAYER.search(tensor_name)
    return int(match.group(1)) if match else None


class Checkpoint:
    """One model folder: its config and a map from tensor name to the shard that holds it."""

    def __init__(self, *, path: Path, config: dict, shards: dict[str, Path]) -> None:
        self.path = path
        self.config = config
        self.shards = shards
        self._handles: dict[Path, object] = {}
        self._layouts: dict[Path, dict[str, tuple[torch.dtype, int, int]]] = {}

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        """Open and validate a model folder; every problem becomes an ``EvomergeError``."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise EvomergeError(
                f"model folder '{path}' does not exist or is not a folder",
                "check the path in the recipe (relative paths are read from the current directory)",
            )
        config_file = path / "config.json"
        if not config_file.is_file():
            raise EvomergeError(
                f"'{path}' has no config.json, so it is not a Hugging Face model folder",
                "point to the folder that holds config.json and the *.safetensors files",
            )
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as error:
            raise EvomergeError(
                f"'{config_file}' is not valid JSON ({error})", "restore the file from the model's source"
            ) from error
        checkpoint = cls(path=path, config=config, shards=_shard_map(path))
        checkpoint._validate_shards()
        return checkpoint

    @property
    def names(self) -> list[str]:
        return list(self.shards)

    @property
    def num_layers(self) -> int:
        return int(self.config.get("num_hidden_layers", 0))

    @cached_property
    def _meta(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        meta = {}
        for name, file in self.shards.items():
            view = self._handle(file).get_slice(name)
            meta[name] = (tuple(view.get_shape()), _DTYPES.get(view.get_dtype(), torch.float32))
        return meta

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def load(self, name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor from its shard onto ``device`` (cast to ``dtype`` after the read)."""
        tensor = self._handle(self.shards[name]).get_tensor(name)
        return tensor.to(device=device, dtype=dtype or tensor.dtype)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Copy one tensor into ``out`` (its shape; any dtype and device, cast on the way) and return ``out``.

        A contiguous CPU ``out`` of the stored dtype is filled by read(2) from the shard, not through
        safetensors' memory map: every mapped page the copy touches stays in the process's resident
        set while the shard is open, which made reading three 212 MB models cost 650 MB of RSS.
        """
        file = self.shards[name]
        layout = self._layout(file)
        stored = layout.get(name)
        if stored is None or out.device.type != "cpu" or not out.is_contiguous() or out.dtype != stored[0]:
            return out.copy_(self._handle(file).get_tensor(name))
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
        """Per tensor of a shard whose dtype torch reads as stored: (dtype, first byte, end byte) in the file.

        safetensors' layout: an 8-byte little-endian header length, the JSON header, then the data,
        with ``data_offsets`` relative to the data's start.
        """
        if file not in self._layouts:
            with file.open("rb") as handle:
                (size,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(size))
            start = 8 + size
            self._layouts[file] = {
                name: (_DTYPES[entry["dtype"]], start + entry["data_offsets"][0], start + entry["data_offsets"][1])
                for name, entry in header.items()
                if name != "__metadata__" and entry["dtype"] in _DTYPES
            }
        return self._layouts[file]

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def _validate_shards(self) -> None:
        for file in sorted(set(self.shards.values())):
            try:
                present = set(self._handle(file).keys())
            except (SafetensorError, OSError) as error:
                raise EvomergeError(
                    f"shard '{file}' is truncated or corrupt ({error})",
                    "download or copy that file again; its size should match the source",
                ) from error
            missing = [name for name, f in self.shards.items() if f == file and name not in present]
            if missing:
                raise EvomergeError(
                    f"the index of '{self.path}' places {len(missing)} tensors (e.g. '{missing[0]}') "
                    f"in '{file.name}', which does not hold them",
                    "the index and the shards come from different versions: fetch the folder again",
                )

    def __repr__(self) -> str:
        return f"Checkpoint('{self.path}')"


def _shard_map(path: Path) -> dict[str, Path]:
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise EvomergeError(
                f"'{index}' is not a valid safetensors index ({error})",
                "restore the file from the model's source",
            ) from error
        absent = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if absent:
            raise EvomergeError(
                f"'{path}' is missing shard file(s) named in its index: {', '.join(absent)}",
                "copy the missing shards into the folder",
            )
        return {name: path / file for name, file in weight_map.items()}
    files = [path / SINGLE_NAME] if (path / SINGLE_NAME).is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        if any(path.glob("*.bin")):
            raise EvomergeError(
                f"'{path}' holds only .bin (pickle) weights, which evomerge does not load because "
                "unpickling can run arbitrary code",
                'convert it once with: python -c "from transformers import AutoModelForCausalLM as M; '
                f"M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\"",
            )
        raise EvomergeError(f"'{path}' holds no *.safetensors weights", "point to a folder with model weights")
    shards: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                shards.update({name: file for name in handle.keys()})
        except (SafetensorError, OSError) as error:
            raise EvomergeError(
                f"shard '{file}' is truncated or corrupt ({error})",
                "download or copy that file again; its size should match the source",
            ) from error
    return shards
