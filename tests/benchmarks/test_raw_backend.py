"""The raw side of ``aoi bench service``: its timing loop."""

from __future__ import annotations

import time

import numpy as np
import pytest

from benchmarks.raw_backend import RawBackend


class _SlowBackend:
    """Every call takes 0.15 s, whatever the batch."""

    def infer(self, x: object) -> None:
        time.sleep(0.15)


def test_raw_rate_counts_whole_calls_when_a_call_outlasts_the_window() -> None:
    raw = object.__new__(RawBackend)  # the timing loop only, without loading a bundle
    raw.backend = _SlowBackend()  # type: ignore[assignment]
    raw._inputs = {4: np.zeros((4, 3, 8, 8), np.float32)}
    calls = raw.calls(4, 0.01, threads=2)  # each call (0.15 s) outlasts the 0.01 s window
    assert len(calls.latencies) == 6 and all(lat >= 0.14 for lat in calls.latencies)
    mean = sum(calls.latencies) / len(calls.latencies)  # 0.15 s plus however much this machine oversleeps
    assert calls.images_per_s <= 2 * 4 / 0.15 and calls.images_per_s == pytest.approx(2 * 4 / mean, rel=0.25)
