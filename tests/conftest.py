"""Shared test setup: skips `gpu` tests where no GPU is present. The markers themselves (`slow`, `gpu`,
`integration`) are set in the test modules; no folder holds only one kind of test."""

from __future__ import annotations

import shutil
import subprocess

import pytest


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
