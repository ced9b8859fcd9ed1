"""Bad input through `evomerge merge`: a one-paragraph message, exit status 2, nothing half-written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from evomerge.cli import main


def write_recipe(path, world, **changes):
    data = {
        "method": "ties",
        "base": str(world.base),
        "models": [
            {"model": str(world.experts["lang"]), "weight": 1.0, "density": 0.5},
            {"model": str(world.experts["math"]), "weight": 1.0, "density": 0.5},
        ],
    }
    data.update(changes)
    path.write_text(yaml.safe_dump(data))
    return path


def broken_copy(world, tmp_path, how):
    copy = tmp_path / f"copy-{how}"
    shutil.copytree(world.experts["math"], copy)
    shards = sorted(copy.glob("*.safetensors"))
    if how == "truncated":
        shards[0].write_bytes(shards[0].read_bytes()[:100])
    elif how == "bin-only":
        for shard in shards:
            shard.unlink()
        (copy / "model.safetensors.index.json").unlink()
        (copy / "pytorch_model.bin").write_bytes(b"not a pickle")
    elif how in REWRITES:
        state = {name: tensor for shard in shards for name, tensor in load_file(shard).items()}
        for shard in shards:
            shard.unlink()
        (copy / "model.safetensors.index.json").unlink()
        config = json.loads((copy / "config.json").read_text())
        state, config = REWRITES[how](state, config)
        save_file(state, str(copy / "model.safetensors"))
        (copy / "config.json").write_text(json.dumps(config))
    return copy


def gptq(state, config):
    """What GPTQ leaves of one linear layer: packed int32 weights and zeros, fp16 scales."""
    name = next(n for n in state if n.endswith("mlp.down_proj.weight"))
    out_features, in_features = state.pop(name).shape
    prefix = name.removesuffix("weight")
    state[prefix + "qweight"] = torch.zeros(in_features // 8, out_features, dtype=torch.int32)
    state[prefix + "qzeros"] = torch.zeros(1, out_features // 8, dtype=torch.int32)
    state[prefix + "scales"] = torch.ones(1, out_features, dtype=torch.float16)
    return state, config


def fp8(state, config):
    name = next(n for n in state if n.endswith("mlp.down_proj.weight"))
    state[name] = state[name].to(torch.float8_e4m3fn)
    return state, config


def multimodal(state, config):
    """Gemma 3's layout: the text model under language_model., a vision tower beside it."""
    state = {f"language_model.{name}": tensor for name, tensor in state.items()}
    state["vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(8, 3, 2, 2)
    config = {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": config,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8},
    }
    return state, config


REWRITES = {
    "gptq": gptq,
    "fp8": fp8,
    "quantization_config": lambda s, c: (s, c | {"quantization_config": {"quant_method": "awq", "bits": 4}}),
    "multimodal": multimodal,
}


def qwen2(tmp_path):
    """A Qwen2 as small as the toy Llama: another family, whose tensors cannot be merged with a Llama's."""
    config = Qwen2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    folder = tmp_path / "qwen2"
    config.save_pretrained(folder)  # the weights by hand: save_pretrained's progress bar would go to stderr
    state = Qwen2ForCausalLM(config).state_dict()
    save_file({name: tensor.clone() for name, tensor in state.items()}, str(folder / "model.safetensors"))
    return folder


CASES = {
    "missing path": (lambda w, t: {"base": str(t / "nowhere")}, "does not exist"),
    "corrupt bin": (
        lambda w, t: {"models": [{"model": str(broken_copy(w, t, "bin-only")), "weight": 1.0}]},
        "cannot be read as plain tensors",
    ),
    "gptq tensors": (
        lambda w, t: {"models": [{"model": str(broken_copy(w, t, "gptq")), "weight": 1.0}]},
        "stored as I32, not as floating point: it is quantized",
    ),
    "fp8 tensors": (
        lambda w, t: {"models": [{"model": str(broken_copy(w, t, "fp8")), "weight": 1.0}]},
        "stored as F8_E4M3, not as floating point",
    ),
    "quantization config": (
        lambda w, t: {"models": [{"model": str(broken_copy(w, t, "quantization_config")), "weight": 1.0}]},
        "is quantized (awq",
    ),
    "multimodal": (
        lambda w, t: {"models": [{"model": str(broken_copy(w, t, "multimodal")), "weight": 1.0}]},
        "is a multimodal checkpoint (Gemma3ForConditionalGeneration: its config has vision_config)",
    ),
    "different family": (
        lambda w, t: {"models": [{"model": str(qwen2(t)), "weight": 1.0}]},
        "has model_type = qwen2 but",
    ),
    "truncated shard": (
        lambda w, t: {"models": [{"model": str(broken_copy(w, t, "truncated")), "weight": 1.0}]},
        "truncated or corrupt",
    ),
    "different hidden size": (
        lambda w, t: {"models": [{"model": str(w.incompatible["hidden"]), "weight": 1.0}]},
        "hidden_size",
    ),
    "different layer count": (
        lambda w, t: {"models": [{"model": str(w.incompatible["layers"]), "weight": 1.0}]},
        "num_hidden_layers",
    ),
    "unknown method": (lambda w, t: {"method": "frankenmerge"}, "unknown merge method"),
    "density out of range": (
        lambda w, t: {"models": [{"model": str(w.experts["math"]), "weight": 1.0, "density": 1.2}]},
        "out of range",
    ),
    "negative weight": (
        lambda w, t: {"models": [{"model": str(w.experts["math"]), "weight": -0.5, "density": 0.5}]},
        "allow_negative_weights: true",
    ),
    "negative density": (
        lambda w, t: {"models": [{"model": str(w.experts["math"]), "weight": 1.0, "density": -0.1}]},
        "out of range",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_a_clear_error_and_no_output(toy_world, tmp_path, capsys, case):
    change, message = CASES[case]
    recipe = write_recipe(tmp_path / "recipe.yaml", toy_world, **change(toy_world, tmp_path))
    out = tmp_path / "out"
    assert main(["merge", str(recipe), str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.count("\n") == 1  # one paragraph
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_output_is_kept_unless_overwrite(toy_world, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", toy_world)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["merge", str(recipe), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"
    assert main(["merge", str(recipe), str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors.index.json").exists() and not (out / "precious.txt").exists()


def test_the_installed_command_exits_2_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "evomerge.cli", "merge", str(tmp_path / "none.yaml"), str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "recipe file" in result.stderr and "Traceback" not in result.stderr
