"""Prometheus collectors of the service, defined once per app on its own registry, and the observer through which
the request middleware, the error handlers, the batcher and the pipeline record into them.

Names, types, labels and buckets are a contract with the deploy dashboards and alerts (docs/CONTRACTS.md, "Metrics
names"): change them only together. Labels stay low-cardinality: no request, part or image ids.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = [
    "BATCH_BUCKETS",
    "LATENCY_BUCKETS",
    "MEGAPIXEL_BUCKETS",
    "REJECT_REASONS",
    "TILE_BUCKETS",
    "FrameReport",
    "ModelLabels",
    "ServiceMetrics",
    "SlidingRate",
    "StageObserver",
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
    "decode_full",
    "memory_full",
    "deadline",
    "request_too_costly",
    "client_gone",
    "shutting_down",
    "records_unavailable",
    "payload_too_large",
    "unsupported_media_type",
    "invalid_image",
    "image_too_large",
    "empty_body",
    "too_many_tiles",
    "unauthorized",
    "forbidden",
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


@dataclass(frozen=True)
class FrameReport:
    """One answered frame, as :meth:`StageObserver.frame_answered` hears of it (times in seconds)."""

    verdict: str  # OK / NG
    inputs: int  # model inputs (1 when not tiled)
    megapixels: float
    postprocess_s: float
    merge_s: float
    tiled_stages: Mapping[str, float] | None  # stage (TILED_STAGES) -> seconds of a tiled frame; None when not tiled
    class_names: Sequence[str]  # one per detection


@dataclass(frozen=True)
class ModelLabels:
    """The labels of ``aoi_model_info``: the model and the runtime it runs on."""

    name: str
    version: str
    architecture: str
    backend: str
    precision: str
    device: str


class StageObserver:
    """What the service reports at its stage boundaries. This base records nothing: it is what a
    :class:`~service.inference.batching.DynamicBatcher` built without metrics gets (unit tests, tools), so callers never
    check for a missing recorder. :class:`ServiceMetrics` records each event into its collectors. Times in seconds."""

    def request_started(self) -> None:
        """An HTTP request came in."""

    def request_finished(self, route: str, status: int, seconds: float) -> None:
        """An HTTP request was answered (``route`` is a served path or ``other``)."""

    def request_rejected(self, reason: str | None) -> None:
        """A request was refused before inference (a :class:`~service.core.errors.ServiceError` ``reason``; None and
        reasons outside :data:`REJECT_REASONS` are not counted)."""

    def request_timed_out(self) -> None:
        """A request passed its deadline (504)."""

    def request_failed(self, reason: str) -> None:
        """A request failed on the server side (500): ``backend_error`` or ``internal_error``."""

    def queued(self, depth: int) -> None:
        """Model inputs now waiting in the batcher's queue."""

    def batch_done(self, size: int, inference_s: float, queue_s: Sequence[float], cpu_s: float = 0.0) -> None:
        """The backend ran a batch of ``size`` inputs; ``queue_s`` is each input's wait, enqueue -> batch start;
        ``cpu_s`` the CPU time of the calling thread inside the backend's call."""

    def frame_decoded(self, seconds: float) -> None:
        """One frame was decoded (and its model inputs prepared)."""

    def frames_inferred(self, frames: int, inputs: int) -> None:
        """A request's ``frames`` frames came back from inference, ``inputs`` model inputs in all."""

    def frame_answered(self, frame: FrameReport) -> None:
        """One frame's result is ready."""

    def model_loaded(self, model: ModelLabels, classes: Sequence[str]) -> None:
        """The model and runtime now in use, and the class names detections will carry."""

    def set_ready(self, ready: bool) -> None:
        """Readiness changed (warm-up passed, or shutting down)."""


class ServiceMetrics(StageObserver):
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
        self.backend_cpu = Counter(
            "aoi_backend_call_cpu_seconds",
            "CPU time of the inference threads inside the backend's call (the model; a runtime's own thread pool, "
            "e.g. ONNX Runtime with intra_op_threads > 1 or OpenVINO, adds CPU on its threads not counted here)",
            registry=r,
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

    def request_started(self) -> None:
        self.inflight.inc()

    def request_finished(self, route: str, status: int, seconds: float) -> None:
        self.inflight.dec()
        self.request_duration.labels(route=route, status=str(status)).observe(seconds)

    def request_rejected(self, reason: str | None) -> None:
        if reason in REJECT_REASONS:
            self.rejected.labels(reason=reason).inc()

    def request_timed_out(self) -> None:
        self.timed_out.inc()

    def request_failed(self, reason: str) -> None:
        self.failed.labels(reason=reason).inc()

    def queued(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def batch_done(self, size: int, inference_s: float, queue_s: Sequence[float], cpu_s: float = 0.0) -> None:
        self.batch_size.observe(size)
        self.backend_cpu.inc(cpu_s)
        self.stage_duration.labels(stage="inference").observe(inference_s)
        queue = self.stage_duration.labels(stage="queue")
        for wait in queue_s:
            queue.observe(wait)

    def frame_decoded(self, seconds: float) -> None:
        self.stage_duration.labels(stage="decode").observe(seconds)

    def frames_inferred(self, frames: int, inputs: int) -> None:
        self.images_processed.inc(frames)
        self.rate.add(frames)
        self.tiles_processed.inc(inputs)

    def frame_answered(self, frame: FrameReport) -> None:
        self.verdicts.labels(verdict=frame.verdict).inc()
        self.tiles_per_frame.observe(frame.inputs)
        self.frame_megapixels.observe(frame.megapixels)
        self.stage_duration.labels(stage="postprocess").observe(frame.postprocess_s)
        self.stage_duration.labels(stage="merge").observe(frame.merge_s)
        for stage, seconds in (frame.tiled_stages or {}).items():
            self.tiled_stage_duration.labels(stage=stage).observe(seconds)
        for name in frame.class_names:
            self.detections.labels(class_name=name).inc()

    def model_loaded(self, model: ModelLabels, classes: Sequence[str]) -> None:
        self.model_info.clear()
        self.model_info.labels(**asdict(model)).set(1)
        for c in classes:
            self.detections.labels(class_name=c)

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)
