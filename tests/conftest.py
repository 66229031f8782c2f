"""Shared test setup: marks tests by folder, skips `gpu` tests where no GPU is present."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

_FOLDER_MARKS: dict[str, list[str]] = {}


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
        folder = Path(str(item.fspath)).parent.name
        for mark in _FOLDER_MARKS.get(folder, []):
            item.add_marker(getattr(pytest.mark, mark))
        if "gpu" in item.keywords:
            if not checked:
                reason, checked = _gpu_reason(), True
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
