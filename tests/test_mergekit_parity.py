"""Whole-model parity with mergekit 0.1.5: the same YAML gives the same tensors (max |diff| <= 1e-5, float32).

mergekit runs in its own interpreter (``EVOMERGE_MERGEKIT_PYTHON``; `make test` installs it in
.venv-mergekit). All configs go through one mergekit process to pay its start-up once.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
import yaml

from evomerge.io.checkpoint import Checkpoint
from evomerge.materialize.to_disk import merge_to_disk
from evomerge.recipe.mergekit import to_mergekit
from tests.test_merge import make_recipe

DETERMINISTIC = [
    "linear",
    "slerp",
    "task_arithmetic",
    "ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "model_stock",
    "sce",
    "nuslerp",
    "multislerp",
    "karcher",
    "nearswap",
    "arcee_fusion",
]
MERGEKIT_PYTHON = os.environ.get("EVOMERGE_MERGEKIT_PYTHON")

RUN_ALL = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
for config_path, out in zip(sys.argv[1::2], sys.argv[2::2]):
    config = MergeConfiguration.model_validate(yaml.safe_load(open(config_path)))
    run_merge(config, out, options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, quiet=True))
"""


@pytest.mark.skipif(
    not MERGEKIT_PYTHON, reason="set EVOMERGE_MERGEKIT_PYTHON to a python with mergekit 0.1.5 (make test does)"
)
def test_same_tensors_as_mergekit(toy_world, tmp_path):
    args = []
    for method in DETERMINISTIC:
        config = tmp_path / f"{method}.yml"
        config.write_text(yaml.safe_dump(to_mergekit(make_recipe(toy_world, method))))
        args += [str(config), str(tmp_path / f"mergekit-{method}")]
    subprocess.run([MERGEKIT_PYTHON, "-c", RUN_ALL, *args], check=True, capture_output=True)
    for method in DETERMINISTIC:
        ours = Checkpoint.open(merge_to_disk(make_recipe(toy_world, method), tmp_path / f"evomerge-{method}"))
        theirs = Checkpoint.open(tmp_path / f"mergekit-{method}")
        assert sorted(ours.names) == sorted(theirs.names)
        worst = max((ours.load(n) - theirs.load(n)).abs().max().item() for n in ours.names)
        assert worst <= 1e-5, f"{method}: max |evomerge - mergekit| = {worst}"
        # Not vacuous: the merge really differs from the base somewhere.
        base = Checkpoint.open(toy_world.base)
        assert any(not torch.equal(ours.load(n), base.load(n)) for n in ours.names), method
