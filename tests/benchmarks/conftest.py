"""Benchmark test fixtures: the synthetic bundle (built as tests/service builds its own)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.synthetic import make_synthetic_bundle


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_bundle(tmp_path_factory.mktemp("bundle"))
