"""Bad input through `evomerge merge`: a one-paragraph message, exit status 2, nothing half-written."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml

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
    return copy


CASES = {
    "missing path": (lambda w, t: {"base": str(t / "nowhere")}, "does not exist"),
    "bin only": (
        lambda w, t: {"models": [{"model": str(broken_copy(w, t, "bin-only")), "weight": 1.0}]},
        "only .bin",
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
