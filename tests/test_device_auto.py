"""device=auto and dtype=auto (the defaults): CUDA and bfloat16 where the workers have a GPU, the CPU and
float32 otherwise; resolved once at a run's start, logged, and recorded in its config.yaml."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from evomerge.config import CONF_DIR, register_configs, resolve_auto
from evomerge.errors import EvomergeError
from evomerge.search.run_folder import RunFolder
from evomerge.search.session import resume, saved_config, start
from tests.toy_config import small_search


def composed(*overrides: str):
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["run_dir=unused", *overrides])


def dtype_name(cfg) -> str:
    return str(getattr(cfg.dtype, "value", cfg.dtype))


@pytest.mark.parametrize(
    ("cuda", "overrides", "expected"),
    [
        (True, [], ("cuda", "bfloat16")),
        (False, [], ("cpu", "float32")),
        (True, ["device=cpu"], ("cpu", "float32")),  # dtype follows the device chosen
        (False, ["device=cuda"], ("cuda", "bfloat16")),
        (True, ["dtype=float32"], ("cuda", "float32")),
        (True, ["device=cuda:1", "dtype=float16"], ("cuda:1", "float16")),
    ],
)
def test_auto_picks_cuda_and_bfloat16_only_where_a_gpu_is(monkeypatch, capsys, cuda, overrides, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cfg = composed(*overrides)
    resolve_auto(cfg)
    assert (cfg.device, dtype_name(cfg)) == expected
    logged = capsys.readouterr().out
    if not overrides:
        assert (composed().device, dtype_name(composed())) == ("auto", "auto")  # the defaults
        where = "CUDA is available here" if cuda else "no CUDA device here"
        assert f"evomerge: device={expected[0]} ({where}) and dtype={expected[1]} (on {expected[0]})" in logged
    elif len(overrides) == 2:
        assert logged == ""  # nothing was chosen for the user: nothing to say


def test_a_driver_joining_a_ray_cluster_asks_the_cluster_not_its_own_machine(monkeypatch, capsys):
    """The README's cluster runs its driver on a head node without a GPU: the workers' GPUs decide."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("evomerge.executor.ray_pool.cluster_gpus", lambda address: 8)
    cfg = composed("executor=ray", "executor.address=auto")
    resolve_auto(cfg)
    assert (cfg.device, dtype_name(cfg)) == ("cuda", "bfloat16")
    assert "the Ray cluster at auto has 8 GPU(s)" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("evomerge.executor.ray_pool.cluster_gpus", lambda address: 0)
    cfg = composed("executor=ray", "executor.address=auto")
    resolve_auto(cfg)
    assert (cfg.device, dtype_name(cfg)) == ("cpu", "float32")


def test_the_toy_preset_stays_on_the_cpu_in_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = composed("preset=toy")
    resolve_auto(cfg)
    assert (cfg.device, dtype_name(cfg)) == ("cpu", "float32")


def test_the_run_records_what_auto_resolved_to(toy_world, tmp_path, monkeypatch):
    """A resume (or an export) on a machine with a GPU reads the run's own device and dtype, not auto again."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run_dir = tmp_path / "run"
    cfg = composed(*small_search(toy_world, run_dir, candidates=2))
    start(cfg, run_dir)
    written = OmegaConf.load(RunFolder(run_dir).config_path)
    assert (written.device, written.dtype) == ("cpu", "float32")
    assert [row["recipe"]["dtype"] for row in RunFolder(run_dir).read_evaluations()] == ["float32"] * 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    resumed = saved_config(RunFolder(run_dir))
    assert (resumed.device, dtype_name(resumed)) == ("cpu", "float32")
    # Asked again on a machine with a GPU, auto means cuda there: a changed config, refused with the diff.
    with pytest.raises(EvomergeError, match="device: 'cpu' -> 'cuda'"):
        resume(run_dir, ["device=auto"], force=False)
