"""Prometheus collectors of the service, defined once per app on its own registry.

Names, types, labels and buckets are a contract with the deploy dashboards and alerts (docs/CONTRACTS.md, "Metrics
names"): change them only together. Labels stay low-cardinality: no request, part or image ids.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = [
    "BATCH_BUCKETS",
    "LATENCY_BUCKETS",
    "MEGAPIXEL_BUCKETS",
    "REJECT_REASONS",
    "TILE_BUCKETS",
    "ServiceMetrics",
    "SlidingRate",
]

LATENCY_BUCKETS = (
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1,
    2.5,
    5,
)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
REJECT_REASONS = (
    "queue_full",
    "payload_too_large",
    "unsupported_media_type",
    "invalid_image",
    "image_too_large",
    "empty_body",
    "too_many_tiles",
)
STAGES = ("decode", "queue", "inference", "postprocess", "merge")
TILE_BUCKETS = (1, 2, 4, 9, 16, 36, 64, 128, 256, 512, 1024, 2048)
MEGAPIXEL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40)
TILED_STAGES = ("decode", "queue", "inference", "merge", "total")


class SlidingRate:
    """Events per second over the last ``window_s`` seconds (monotonic clock); thread-safe."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self._start = time.monotonic()

    def add(self, n: int, now: float | None = None) -> None:
        with self._lock:
            self._events.append((time.monotonic() if now is None else now, n))

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._events and self._events[0][0] < now - self.window_s:
                self._events.popleft()
            total = sum(n for _, n in self._events)
        # Right after startup the window is not full yet: divide by the time actually covered.
        span = min(self.window_s, max(now - self._start, 1e-3))
        return total / span


class ServiceMetrics:
    """All collectors of one service instance, registered on ``registry`` (a fresh one per app by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            "aoi_request_duration_seconds",
            "HTTP request duration",
            ["route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "aoi_stage_duration_seconds",
            "Duration of each processing stage",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tiled_stage_duration = Histogram(
            "aoi_tiled_frame_stage_seconds",
            "Duration of each stage for frames that were tiled (per frame; total = arrival to answer)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tiles_per_frame = Histogram(
            "aoi_tiles_per_frame", "Model inputs per frame (1 when not tiled)", buckets=TILE_BUCKETS, registry=r
        )
        self.frame_megapixels = Histogram(
            "aoi_frame_megapixels", "Frame size in megapixels", buckets=MEGAPIXEL_BUCKETS, registry=r
        )
        self.tiles_processed = Counter(
            "aoi_model_inputs_processed", "Model inputs (images or tiles) inferred successfully", registry=r
        )
        self.batch_size = Histogram(
            "aoi_batch_size", "Model inputs (images or tiles) per inference batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("aoi_queue_depth", "Model inputs (images or tiles) waiting for a batch", registry=r)
        self.inflight = Gauge("aoi_inflight_requests", "HTTP requests being processed", registry=r)
        self.images_processed = Counter("aoi_images_processed", "Images inferred successfully", registry=r)
        self.throughput = Gauge(
            "aoi_throughput_images_per_second", "Images per second over a sliding 10 s window", registry=r
        )
        self.rejected = Counter("aoi_requests_rejected", "Requests rejected before inference", ["reason"], registry=r)
        self.timed_out = Counter("aoi_requests_timed_out", "Requests past their deadline (504)", registry=r)
        self.failed = Counter("aoi_requests_failed", "Requests failed by the server (500)", ["reason"], registry=r)
        self.verdicts = Counter("aoi_verdicts", "Verdicts returned", ["verdict"], registry=r)
        self.detections = Counter("aoi_detections", "Detections returned", ["class_name"], registry=r)
        self.model_info = Gauge(
            "aoi_model_info",
            "Model and runtime in use (value 1)",
            ["name", "version", "architecture", "backend", "precision", "device"],
            registry=r,
        )
        self.ready = Gauge("aoi_ready", "1 when the model is loaded and warmed up", registry=r)
        self.rate = SlidingRate(10.0)
        self.throughput.set_function(self.rate.rate)
        for stage in STAGES:
            self.stage_duration.labels(stage=stage)
        for stage in TILED_STAGES:
            self.tiled_stage_duration.labels(stage=stage)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason)
        for reason in ("backend_error", "internal_error"):
            self.failed.labels(reason=reason)
        for v in ("OK", "NG"):
            self.verdicts.labels(verdict=v)

    def set_model(
        self,
        *,
        name: str,
        version: str,
        architecture: str,
        backend: str,
        precision: str,
        device: str,
        classes: list[str],
    ) -> None:
        self.model_info.clear()
        self.model_info.labels(
            name=name, version=version, architecture=architecture, backend=backend, precision=precision, device=device
        ).set(1)
        for c in classes:
            self.detections.labels(class_name=c)

    def images_done(self, n: int) -> None:
        self.images_processed.inc(n)
        self.rate.add(n)
