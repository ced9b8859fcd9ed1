"""The presets compose and pass the config checks: the real-size example names tasks lm-eval has (no model
is loaded: its paths are a cluster's), and the toy one searches one weight group per layer of any world."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from evomerge.config import CONF_DIR, check_config, register_configs
from evomerge.search.session import build_genome, template_recipe
from evomerge.toy import ToyWorld


def composed(*overrides: str, preset: str = "mistral_ja_math"):
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"preset={preset}", *overrides])


def test_toy_preset_gives_each_layer_and_tensor_kind_its_own_weight(toy_world: ToyWorld, tmp_path: Path):
    experts = f"[{toy_world.experts['math']},{toy_world.experts['lang']}]"
    cfg = composed(f"models.base={toy_world.base}", f"models.experts={experts}", preset="toy")
    check_config(cfg)
    genome = build_genome(cfg, template_recipe(cfg), tmp_path)
    # The tiny world has 2 layers: 2 experts x 2 layer groups x 5 tensor kinds (4 filters and the rest).
    assert genome.dimension == 2 * 2 * 5
    recipe = genome.to_recipe(np.linspace(0.0, 1.0, genome.dimension))
    weight = recipe.models[1].parameters["weight"]
    # Coordinates map linearly onto [0, 1.5]; the lang expert's mlp genes are coordinates 13 and 18 of
    # 0..19 (model-major, then layer group, then filter: embed_tokens, lm_head, self_attn, mlp, the rest).
    step = 1.5 / (genome.dimension - 1)
    assert weight.at("model.layers.0.mlp.up_proj.weight", 0.0) == pytest.approx(13 * step)
    assert weight.at("model.layers.1.mlp.up_proj.weight", 1.0) == pytest.approx(18 * step)
    assert weight.at("model.embed_tokens.weight", 0.0) == pytest.approx(10 * step)


@pytest.mark.parametrize("order", ["preset first", "method first"])
def test_a_method_on_the_command_line_replaces_the_presets(order: str):
    """`preset=toy method=ties` searches TIES: the preset's method is a default, not a value set after the choice."""
    register_configs()
    overrides = ["preset=toy", "method=ties"] if order == "preset first" else ["method=ties", "preset=toy"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        assert compose("config", overrides=overrides).method.name == "ties"
        assert compose("config", overrides=["preset=toy"]).method.name == "task_arithmetic"
    assert composed("method=ties").method.name == "ties"  # mistral_ja_math's default is dare_ties


def test_mistral_ja_math_composes_into_a_per_layer_ray_search_that_passes_the_checks():
    cfg = composed()
    check_config(cfg)
    assert (cfg.method.name, cfg.executor.kind, cfg.device, cfg.dtype) == ("dare_ties", "ray", "cuda", "bfloat16")
    assert cfg.genome.kind == "ps" and cfg.genome.layer_groups == 32  # Mistral-7B's num_hidden_layers
    assert len(cfg.models.experts) == 3
    # The preset's group choices are defaults, so the command line still wins over them; the single-GPU
    # variant its comment gives passes the checks too.
    serial = composed("executor=serial", "executor.timeout_s=null")
    check_config(serial)
    assert serial.executor.kind == "serial"


def test_mistral_ja_math_objectives_read_metrics_its_lm_eval_tasks_report():
    from lm_eval.tasks import TaskManager

    cfg = composed()
    index = TaskManager().task_index  # lm-eval's own registry (indexing it takes ~10-25 s)
    for objective in cfg.objectives:
        for term in objective.terms:
            task, _, metric = term.partition("/")
            assert task in cfg.tasks.names, term
            assert metric in [m["metric"] for m in index[task].cfg["metric_list"]], term
    for task in cfg.tasks.names:
        assert task in index, f"lm-eval {task!r} is not a registered task"
