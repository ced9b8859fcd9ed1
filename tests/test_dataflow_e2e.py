"""Data-flow searches end to end on the tiny toy world: the real CLI, Hydra config, lm-eval and export.

Marked e2e: slower than unit tests, still run in CI.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.evaluate.lm_eval_scorer import LMEvalScorer
from evomerge.export import export_run
from evomerge.search.run_folder import RunFolder
from evomerge.search.session import task_set
from tests.test_search_e2e import evomerge, finished, kill_when_logged, overrides, rows

pytestmark = pytest.mark.e2e

# 3 sources of 2 layers, laid out twice: 12 slots; a path of more than 8 layers is scored worst.
DFS = ["genome=dfs", "genome.repeats=2", "genome.max_path_length=8", "genome.embedding_source=2"]


@pytest.fixture(scope="module")
def dfs_run(toy_world, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dfs") / "run"
    finished(["search", *overrides(toy_world, run_dir, *DFS)])
    return run_dir


def test_a_killed_dfs_search_resumes_to_the_same_rows(toy_world, dfs_run, tmp_path):
    reference = rows(dfs_run)
    assert len(reference) == 12
    logged = RunFolder(dfs_run).read_evaluations()
    assert all(row["recipe"]["kind"] == "dataflow" for row in logged)
    assert any(row["error"] is None for row in logged)
    run_dir = tmp_path / "killed"
    kill_when_logged(run_dir, evomerge("search", *overrides(toy_world, run_dir, *DFS)), 6)  # mid-generation 1
    assert len(RunFolder(run_dir).read_evaluations()) < 12
    finished(["resume", str(run_dir)])
    assert rows(run_dir) == reference


def test_the_exported_dfs_model_scores_what_the_search_logged(dfs_run, tmp_path):
    (out,) = export_run(dfs_run, tmp_path / "best")
    best = RunFolder(dfs_run).load_checkpoint().best
    remote = (out / "modeling_dataflow.py").exists()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=remote)
    assert model.config.num_hidden_layers == len(best.recipe["path"])
    metrics = LMEvalScorer(
        model=model,
        tokenizer=AutoTokenizer.from_pretrained(out, trust_remote_code=remote),
        tasks=task_set(OmegaConf.load(dfs_run / "config.yaml")),
    ).score()
    assert metrics == best.metrics


def test_ps_dfs_merges_the_ps_recipe_into_the_run_and_searches_through_it(toy_world, tmp_path):
    ps_recipe = tmp_path / "ps.yaml"
    ps_recipe.write_text(
        yaml.safe_dump(
            {
                "method": "task_arithmetic",
                "base": str(toy_world.base),
                "models": [
                    {"model": str(toy_world.experts["math"]), "weight": 0.7},
                    {"model": str(toy_world.experts["lang"]), "weight": 0.7},
                ],
            }
        )
    )
    run_dir = tmp_path / "run"
    extra = ["genome=ps_dfs", f"genome.ps_source={ps_recipe}", "genome.repeats=1", "budget.evaluations=4"]
    finished(["search", *overrides(toy_world, run_dir, *extra)])
    logged = RunFolder(run_dir).read_evaluations()
    assert (run_dir / "ps_source" / "config.json").exists()
    assert [row["recipe"]["sources"][0] for row in logged] == [str(run_dir / "ps_source")] * 4
    assert len(logged[0]["recipe"]["sources"]) == 4  # the PS merge, then base, math, lang


def test_a_dfs_search_started_at_the_embedding_source_starts_at_its_score(toy_world, tmp_path):
    """genome.start=embedding_source with a small step: the first generation is the lang expert's own
    path (all its layers, nothing else), so it scores exactly what the lang expert scores alone."""
    run_dir = tmp_path / "run"
    start = ["genome.start=embedding_source", "optimizer.sigma0=0.1", "budget.evaluations=4"]
    finished(["search", *overrides(toy_world, run_dir, *DFS, *start)])
    first = RunFolder(run_dir).read_evaluations()[:4]
    assert [[(s["source"], s["layer"]) for s in row["recipe"]["path"]] for row in first] == [[(2, 0), (2, 1)]] * 4
    lang = AutoModelForCausalLM.from_pretrained(toy_world.experts["lang"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(toy_world.experts["lang"])
    tasks = task_set(OmegaConf.load(run_dir / "config.yaml"))
    alone = LMEvalScorer(model=lang, tokenizer=tokenizer, tasks=tasks).score()
    assert [row["metrics"] for row in first] == [alone] * 4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("genome=ps_dfs", "genome.ps_source=None is not allowed"),
        ("genome.kind=layer_swap", "genome.kind=layer_swap is not allowed"),
        ("genome.sources=[BASE,HIDDEN]", "hidden_size = 48 but .* has hidden_size = 32"),
        ("genome.start=embedding_source", "genome.start=embedding_source is not allowed"),  # with genome=ps
    ],
)
def test_bad_dfs_configs_are_refused_before_the_run_starts(toy_world, tmp_path, override, message):
    from hydra import compose, initialize_config_dir

    from evomerge.config import CONF_DIR, register_configs
    from evomerge.errors import EvomergeError
    from evomerge.search.session import start

    override = override.replace("BASE", str(toy_world.base)).replace("HIDDEN", str(toy_world.incompatible["hidden"]))
    register_configs()
    extra = ["genome=dfs", override] if override.startswith("genome.sources") else [override]
    with pytest.raises(EvomergeError, match=message), initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        start(compose("config", overrides=overrides(toy_world, tmp_path / "run", *extra)), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_ps_source_must_name_a_ps_recipe_or_a_ps_run(dfs_run, tmp_path):
    from evomerge.errors import EvomergeError
    from evomerge.search.session import ps_recipe

    for wrong in (dfs_run, tmp_path / "absent"):
        with pytest.raises(EvomergeError, match="neither a recipe file nor a run folder whose best candidate is a PS"):
            ps_recipe(wrong)
