"""The raw side of ``aoi bench service``: the bundle's backend called directly from threads, timed per call.

Loaded with the same settings as the service it is compared with (backend, precision, batch size, instances), so the
ratio of the two measures what HTTP, decoding and batching cost and nothing else.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from service.backends import InferenceBackend, backend_from_settings
from service.core.bundle import InputSpec, ModelBundle
from service.settings import Settings

__all__ = ["BackendCalls", "RawBackend", "percentile", "random_input", "time_calls"]


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` (NaN when there are none)."""
    return float(np.percentile(values, q)) if values else float("nan")


@dataclass
class BackendCalls:
    """Backend calls of one timed run: per-call latencies, and per thread the images it ran and the seconds from the
    start to the end of its last call."""

    latencies: list[float] = field(default_factory=list)
    per_thread: list[tuple[int, float]] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        """Sum of the threads' own rates: whole calls only, so a batch slower than the window still counts."""
        return sum(n / s for n, s in self.per_thread if s > 0)


def time_calls(backend: InferenceBackend, x: npt.NDArray[np.float32], seconds: float, threads: int) -> BackendCalls:
    """``threads`` threads calling ``backend.infer(x)`` for ``seconds`` (at least 3 calls each)."""
    batch = x.shape[0]
    out = BackendCalls()
    lock = threading.Lock()
    t0 = time.perf_counter()
    t_end = t0 + seconds

    def work() -> None:
        mine: list[float] = []
        done = t0
        while done < t_end or len(mine) < 3:
            start = time.perf_counter()
            backend.infer(x)
            done = time.perf_counter()
            mine.append(done - start)
        with lock:
            out.latencies.extend(mine)
            out.per_thread.append((batch * len(mine), done - t0))

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return out


def random_input(spec: InputSpec, batch: int, rng: np.random.Generator) -> npt.NDArray[Any]:
    """A random model input of ``batch`` rows as the bundle takes it: float32 NCHW in [0, 1), or uint8 NHWC pixels."""
    if spec.pixels_in_graph:
        return rng.integers(0, 256, (batch, *spec.sample_shape), dtype=np.uint8)
    return rng.random((batch, *spec.sample_shape), dtype=np.float32)


class RawBackend:
    """The bundle on the same backend, instances and threads as the service, called directly from threads."""

    def __init__(self, settings: Settings, bundle: ModelBundle) -> None:
        self.choice = backend_from_settings(settings, bundle)
        self.backend = self.choice.backend
        self.backend.warmup()
        self.instances = self.choice.instances
        rng = np.random.default_rng(0)
        self._inputs = {b: random_input(bundle.input, b, rng) for b in self.backend.batch_sizes}

    def info(self) -> dict[str, Any]:
        b = self.backend
        return {
            "backend": b.kind,
            "device": b.device,
            "precision": b.precision,
            "instances": self.instances,
            "intra_op_threads": getattr(b, "intra_op_threads", None),
            "reason": self.choice.reason,
        }

    def calls(self, batch: int, seconds: float, threads: int) -> BackendCalls:
        """``threads`` threads calling ``infer`` on a batch of ``batch`` for ``seconds`` (at least 3 calls each)."""
        return time_calls(self.backend, self._inputs[batch], seconds, threads)

    def sweep(self, seconds_per_size: float) -> list[dict[str, Any]]:
        sizes = [
            b for b in self.backend.batch_sizes if b in (1, 2, 4, 8, 16, 32, 64) or b == self.backend.batch_sizes[-1]
        ]
        rows = []
        for b in sizes:
            busy = self.calls(b, seconds_per_size, self.instances)
            alone = self.calls(b, seconds_per_size / 2, 1)
            rows.append(
                {
                    "batch": b,
                    "images_per_s": busy.images_per_s,
                    "latency_ms_p50": percentile(alone.latencies, 50) * 1e3,
                    "busy_latency_ms_p50": percentile(busy.latencies, 50) * 1e3,
                }
            )
        return rows

    def close(self) -> None:
        self.backend.close()
