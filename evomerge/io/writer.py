"""Write a model folder: sharded safetensors with an index, plus config, tokenizer and a model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from evomerge.io.checkpoint import INDEX_NAME

# Files copied verbatim from the tokenizer source; whichever of them exist.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class ShardedWriter:
    """Accumulate tensors in memory up to ``max_shard_bytes`` and write each shard as it fills.

    Shards are named ``model-0000i-of-0000N.safetensors`` as transformers does; N is known only at
    the end, so shards are written under provisional names and renamed in ``finish``.
    """

    def __init__(self, *, folder: Path, max_shard_bytes: int = 2 * 1024**3) -> None:
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def finish(self) -> None:
        """Write the last shard, give all shards their final names and write the index."""
        if self._pending:
            self._flush()
        count = len(self._written)
        weight_map = {}
        for i, (provisional, names) in enumerate(self._written, start=1):
            final = self.folder / f"model-{i:05d}-of-{count:05d}.safetensors"
            provisional.rename(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def _flush(self) -> None:
        provisional = self.folder / f"shard-{len(self._written):05d}.partial"
        save_file(self._pending, str(provisional), metadata={"format": "pt"})
        self._written.append((provisional, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0


def write_model_files(*, folder: Path, config: dict, dtype: torch.dtype, source: Path, tokenizer_source: Path) -> None:
    """Write config.json (with the output dtype), generation config and tokenizer files."""
    config = dict(config)
    config["torch_dtype"] = _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    config.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (source / "generation_config.json").is_file():
        shutil.copyfile(source / "generation_config.json", folder / "generation_config.json")
    for name in TOKENIZER_FILES:
        if (tokenizer_source / name).is_file():
            shutil.copyfile(tokenizer_source / name, folder / name)
