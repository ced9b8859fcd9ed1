"""The real-size example preset composes, passes the config checks, and names tasks lm-eval has.

No model is loaded (the preset's model paths are a cluster's, not this machine's)."""

from __future__ import annotations

from hydra import compose, initialize_config_dir

from evomerge.config import CONF_DIR, check_config, register_configs


def composed(*overrides: str):
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["preset=mistral_ja_math", *overrides])


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
