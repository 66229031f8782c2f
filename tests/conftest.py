"""Shared test setup: skips `gpu` tests where no GPU is present; every test's service keeps its records under its own
temporary folder (never the checkout's data/). The markers themselves (`slow`, `gpu`, `integration`) are set in the
test modules; no folder holds only one kind of test."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _records_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``data_dir`` defaults to ./data: each test's service (and its subprocesses) writes into its own tmp folder."""
    monkeypatch.setenv("AOI_DATA_DIR", str(tmp_path / "aoi-data"))


def _gpu_reason() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return "no GPU: nvidia-smi not found"
    try:
        subprocess.run(["nvidia-smi", "-L"], check=True, capture_output=True, timeout=20)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"no GPU: nvidia-smi -L failed ({exc})"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None
    checked = False
    for item in items:
        if "gpu" in item.keywords:
            if not checked:
                reason, checked = _gpu_reason(), True
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def anyio_backend() -> str:
    """The service runs on asyncio (uvicorn's loop): async tests run there only, even where trio is installed (selenium
    brings it), since anyio would otherwise run each of them on trio too."""
    return "asyncio"
