"""CMA-ES scores its own start in the first generation (issue 32, point 3), and the summary says when a
search could not tell its candidates apart."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.evaluate.lm_eval_scorer import LMEvalScorer
from evomerge.executor.worker import Outcome
from evomerge.genome.dfs import DataFlowGenome
from evomerge.optimizer.cmaes import CMAESOptimizer
from evomerge.search.progress import summary_table
from evomerge.search.run_folder import RunFolder
from evomerge.search.session import task_set
from tests.test_dataflow_e2e import DFS
from tests.test_search_e2e import finished, overrides
from tests.test_search_loop import OBJECTIVES, CountingEvaluator, genome, search

# 3 sources of 2 layers, twice: 12 on/off genes and 6 scales; the start is source 2's own two layers.
DFS_GENOME = {"sources": ("a", "b", "c"), "layer_counts": [2, 2, 2], "embedding_source": 2, "repeats": 2}


def asked(optimizer: CMAESOptimizer, generations: int) -> list[np.ndarray]:
    """The points asked over `generations`, every candidate told the same score."""
    points = []
    for _ in range(generations):
        proposals = optimizer.ask()
        points += [p.x for p in proposals]
        optimizer.tell(proposals, [(0.0,)] * len(proposals))
    return points


def test_a_dfs_start_is_the_first_candidate_and_is_asked_once():
    space = DataFlowGenome(**DFS_GENOME, start="embedding_source").space
    start = space.from_unit(space.start)
    assert start[:12].tolist() == [0, 0, 0, 0, 1, 1] + [0] * 6 and start[12:].tolist() == [0.5] * 6
    points = asked(CMAESOptimizer(space=space, n_objectives=1, seed=0), 3)
    # The scales are continuous, so only the injected start can equal it exactly.
    assert np.array_equal(points[0], start)
    assert sum(np.array_equal(x, start) for x in points) == 1
    assert len({tuple(x) for x in points[1:12]}) > 1  # the rest of generation 0 still samples around it


def test_a_checkpoint_before_or_during_the_first_generation_asks_the_start_once():
    space = DataFlowGenome(**DFS_GENOME, start="embedding_source").space
    uninterrupted = asked(CMAESOptimizer(space=space, n_objectives=1, seed=0), 2)
    first = CMAESOptimizer(space=space, n_objectives=1, seed=0)
    before = pickle.dumps(first.state_dict())
    first.ask()  # the process dies before this generation is told
    during = pickle.dumps(first.state_dict())
    for saved in (before, during):
        resumed = CMAESOptimizer(space=space, n_objectives=1, seed=7)
        resumed.load_state_dict(pickle.loads(saved))
        again = asked(resumed, 2)
        assert all(np.array_equal(a, b) for a, b in zip(again, uninterrupted, strict=True))


def test_without_a_start_point_the_first_generation_is_sampled_as_before():
    """No start point (a PS genome, DFS at the box centre): CMA-ES's samples only, as the paper's."""
    space = genome().space
    first = CMAESOptimizer(space=space, n_objectives=1, seed=0).ask()
    assert not any(np.array_equal(p.x, space.from_unit(np.full(len(space), 0.5))) for p in first)
    dfs = CMAESOptimizer(space=DataFlowGenome(**DFS_GENOME).space, n_objectives=1, seed=0).ask()
    assert not any(p.x[:12].all() for p in dfs)  # the DFS centre thresholds to every slot on


class Flat(CountingEvaluator):
    """Every candidate scores 0: the landscape of a DFS search among random half-stacks (issue 32)."""

    def __call__(self, recipes):
        for position, _ in enumerate(recipes):
            yield position, Outcome(metrics={"toy/acc": 0.0}, error=None, seconds=0.001)


def test_the_summary_says_when_every_candidate_scored_the_same(tmp_path):
    flat = summary_table(search(tmp_path / "flat", Flat(), evaluations=16), [o["name"] for o in OBJECTIVES])
    assert "every candidate scored 0.0000: the search could not tell them apart" in flat
    assert "genome.start=embedding_source" in flat
    varied = summary_table(search(tmp_path / "varied", CountingEvaluator(), evaluations=16), ["fit"])
    assert "every candidate scored" not in varied


@pytest.mark.e2e
def test_a_dfs_search_from_the_embedding_source_scores_that_model_first(toy_world, tmp_path):
    """With seed 3 and a wide step (sigma0 0.5), none of generation 0's four samples is the lang expert's
    path (so none was scored before the start was injected); its first candidate is now that path
    itself and scores exactly what the lang expert scores alone."""
    run_dir = tmp_path / "run"
    start = ["genome.start=embedding_source", "optimizer.sigma0=0.5", "budget.evaluations=4", "seed=3"]
    finished(["search", *overrides(toy_world, run_dir, *DFS, *start)])
    logged = RunFolder(run_dir).read_evaluations()
    assert [(s["source"], s["layer"], s["scale"]) for s in logged[0]["recipe"]["path"]] == [(2, 0, 1.0), (2, 1, 1.0)]
    assert any(row["recipe"]["path"] != logged[0]["recipe"]["path"] for row in logged[1:])
    lang = AutoModelForCausalLM.from_pretrained(toy_world.experts["lang"], dtype=torch.float32)
    tasks = task_set(OmegaConf.load(run_dir / "config.yaml"))
    alone = LMEvalScorer(model=lang, tokenizer=AutoTokenizer.from_pretrained(toy_world.experts["lang"]), tasks=tasks)
    assert logged[0]["metrics"] == alone.score()
