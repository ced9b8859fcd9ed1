"""`pip install .` (not editable) gives an evomerge whose configs come with it, wherever it is run from."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_plain_install_ships_the_configs_and_composes_them_from_any_folder(tmp_path):
    # Built from a copy, so the build leaves nothing in the checkout.
    source = tmp_path / "source"
    shutil.copytree(REPO / "evomerge", source / "evomerge", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", target, source],
        check=True,
        capture_output=True,
    )
    shipped = sorted(
        p.relative_to(target / "evomerge" / "conf") for p in (target / "evomerge" / "conf").rglob("*.yaml")
    )
    in_repo = sorted(p.relative_to(REPO / "evomerge" / "conf") for p in (REPO / "evomerge" / "conf").rglob("*.yaml"))
    assert shipped == in_repo and Path("config.yaml") in shipped

    # Composed in a folder that holds no conf/, from the installed copy only.
    script = (
        "from hydra import compose, initialize_config_dir\n"
        "from evomerge.config import CONF_DIR, register_configs\n"
        "register_configs()\n"
        "with initialize_config_dir(str(CONF_DIR), version_base='1.3'):\n"
        "    cfg = compose('config', overrides=['optimizer=nsga2', 'method=ties'])\n"
        "print(CONF_DIR, cfg.optimizer._target_, cfg.method.name)\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    shown = subprocess.run(
        [sys.executable, "-c", script], cwd=elsewhere, env=env, check=True, capture_output=True, text=True
    ).stdout.split()
    assert Path(shown[0]) == target / "evomerge" / "conf"
    assert shown[1].endswith("NSGA2Optimizer") and shown[2] == "ties"
