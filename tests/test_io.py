"""Model I/O: lazy reads, refusals of unsafe or broken folders, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from evomerge.errors import EvomergeError
from evomerge.io.atomic import atomic_folder
from evomerge.io.checkpoint import Checkpoint
from evomerge.io.compatibility import check_compatible
from evomerge.io.writer import ShardedWriter

CONFIG = {"model_type": "llama", "hidden_size": 4, "num_hidden_layers": 2, "num_attention_heads": 1}


def make_folder(path, tensors, shards=2, config=CONFIG):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    writer = ShardedWriter(folder=path, max_shard_bytes=max(1, sum(t.numel() * 4 for t in tensors.values()) // shards))
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    writer.finish()
    return path


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.mlp.weight": torch.randn(4, 4, generator=g) for i in range(2)} | {
        "lm_head.weight": torch.randn(8, 4, generator=g)
    }


def test_sharded_folder_reads_back_lazily(tmp_path):
    original = tensors()
    folder = make_folder(tmp_path / "m", original, shards=3)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert index["weight_map"]["lm_head.weight"].endswith("-of-00003.safetensors")
    checkpoint = Checkpoint.open(folder)
    assert checkpoint.num_layers == 2 and checkpoint.shape("lm_head.weight") == (8, 4)
    for name, tensor in original.items():
        assert torch.equal(checkpoint.load(name), tensor)
    assert checkpoint.load("lm_head.weight", dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_read_into_reads_the_stored_bytes_and_casts_otherwise(tmp_path, dtype):
    """read_into fills a buffer of the stored dtype straight from the file (a strided view of a larger
    buffer, as the to-disk merge passes, included) and casts into any other dtype."""
    original = {name: tensor.to(dtype) for name, tensor in tensors(seed=3).items()}
    checkpoint = Checkpoint.open(make_folder(tmp_path / "m", original))
    flat = torch.full((100,), float("nan"), dtype=dtype)
    for name, tensor in original.items():
        view = flat[: tensor.numel()].view(tensor.shape)
        assert checkpoint.read_into(name, view) is view and torch.equal(view, tensor)
        cast = checkpoint.read_into(name, torch.empty(tensor.shape, dtype=torch.float64))
        assert torch.equal(cast, tensor.double())
    with pytest.raises(EvomergeError, match="bytes"):
        checkpoint.read_into("lm_head.weight", torch.empty(4, 4, dtype=dtype))


def test_missing_folder_and_missing_config(tmp_path):
    with pytest.raises(EvomergeError, match="does not exist"):
        Checkpoint.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvomergeError, match="no config.json"):
        Checkpoint.open(tmp_path / "empty")


def test_corrupt_bin_is_named(tmp_path):
    """.bin folders are read weights-only (tests/test_io_sources.py); a file that is no such pickle is named."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    with pytest.raises(EvomergeError, match="pytorch_model.bin' cannot be read as plain tensors"):
        Checkpoint.open(folder)


def test_truncated_shard_is_named(tmp_path):
    folder = make_folder(tmp_path / "m", tensors())
    shard = sorted(folder.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(EvomergeError, match=f"shard '.*{shard.name}' is truncated or corrupt"):
        Checkpoint.open(folder)


def test_missing_shard_named_by_index(tmp_path):
    folder = make_folder(tmp_path / "m", tensors())
    sorted(folder.glob("*.safetensors"))[-1].unlink()
    with pytest.raises(EvomergeError, match="missing shard"):
        Checkpoint.open(folder)


def test_single_file_checkpoint(tmp_path):
    folder = tmp_path / "single"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    save_file(tensors(), str(folder / "model.safetensors"))
    assert set(Checkpoint.open(folder).names) == set(tensors())


def test_compatibility_errors(tmp_path):
    a = Checkpoint.open(make_folder(tmp_path / "a", tensors()))
    wider = {k: torch.zeros(v.shape[0], v.shape[1] + 1) for k, v in tensors().items()}
    b = Checkpoint.open(make_folder(tmp_path / "b", wider))
    with pytest.raises(EvomergeError, match="has shape"):
        check_compatible(a, [b])
    c = Checkpoint.open(make_folder(tmp_path / "c", tensors(), config=CONFIG | {"num_hidden_layers": 3}))
    with pytest.raises(EvomergeError, match="num_hidden_layers = 3"):
        check_compatible(a, [c])
    fewer = dict(list(tensors().items())[:2])
    d = Checkpoint.open(make_folder(tmp_path / "d", fewer))
    with pytest.raises(EvomergeError, match="hold different tensors"):
        check_compatible(a, [d])


def test_atomic_folder_leaves_nothing_on_failure_and_keeps_old_on_overwrite(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_folder(out, overwrite=False) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("killed")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_folder(out, overwrite=False) as tmp:
        (tmp / "v1").write_text("1")
    with pytest.raises(EvomergeError, match="already exists"), atomic_folder(out, overwrite=False):
        pass
    with pytest.raises(RuntimeError), atomic_folder(out, overwrite=True) as tmp:
        raise RuntimeError("killed")
    assert (out / "v1").read_text() == "1"
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "v2").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["v2"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
