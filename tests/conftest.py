"""Shared fixtures: the tiny toy world, built once per test session by the project's own builder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from evomerge.toy import ToyWorld, build_world


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory: pytest.TempPathFactory) -> ToyWorld:
    # EVOMERGE_TEST_CACHE lets a developer keep the tiny world between runs; CI builds it fresh.
    root = os.environ.get("EVOMERGE_TEST_CACHE") or tmp_path_factory.mktemp("toy")
    return build_world(size="tiny", seed=0, root=Path(root))
