"""The inspection pipeline behind the routes: decode + letterbox (thread pool) -> dynamic batch -> post-process ->
verdict, with the stage metrics. One :class:`InspectionService` per app, built in the lifespan."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.backends import BackendChoice
from service.batching import BatchResult, DynamicBatcher, resolve_max_delay_ms
from service.bundle import ModelBundle, VerdictRule
from service.errors import BackendFailure, DeadlineExceeded, ImageError, PostprocessFailure
from service.metrics import ServiceMetrics
from service.postprocess import Detections, postprocess, verdict
from service.preprocess import LetterboxInfo, decode_image, letterbox, to_chw
from service.schemas import Detection, InspectResult, ModelInfo, Timings
from service.settings import Settings

__all__ = ["ImageUpload", "InspectionService", "effective_thresholds"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageUpload:
    data: bytes
    filename: str | None = None


@dataclass(frozen=True)
class _Prepared:
    x: npt.NDArray[np.float32]  # (3, H, W) network input
    info: LetterboxInfo
    decode_s: float


def effective_thresholds(bundle: ModelBundle, overrides: dict[str, float]) -> dict[str, float]:
    """Per-class thresholds: the bundle's, replaced by ``overrides`` (settings).

    Raises:
        ValueError: an override names a class the bundle does not have.
    """
    unknown = sorted(set(overrides) - set(bundle.classes))
    if unknown:
        raise ValueError(f"score_thresholds: unknown classes {unknown}; the bundle has {bundle.classes}")
    base = dict(zip(bundle.classes, bundle.thresholds(), strict=True))
    return {**base, **overrides}


class InspectionService:
    """Everything a request needs, created once per app from settings, bundle and the chosen backend."""

    def __init__(self, settings: Settings, bundle: ModelBundle, choice: BackendChoice, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.bundle = bundle
        self.backend = choice.backend
        self.backend_reason = choice.reason
        self.metrics = metrics
        self.thresholds = effective_thresholds(bundle, settings.score_thresholds)
        self._thr = np.asarray([self.thresholds[c] for c in bundle.classes], np.float32)
        self.verdict_rule: VerdictRule = settings.verdict or bundle.verdict
        unknown = sorted(set(self.verdict_rule.reject_classes or []) - set(bundle.classes))
        if unknown:
            raise ValueError(f"verdict.reject_classes: unknown classes {unknown}; the bundle has {bundle.classes}")
        self.batcher = DynamicBatcher(
            self.backend,
            max_batch_size=settings.max_batch_size,
            max_delay_ms=resolve_max_delay_ms(settings.max_delay_ms, choice.backend.kind),
            queue_size=settings.queue_size,
            instances=choice.instances,
            finish=self._postprocess,
            metrics=metrics,
        )
        self.pool = ThreadPoolExecutor(max_workers=settings.decode_workers, thread_name_prefix="aoi-decode")
        self.warmup_ms: dict[int, float] = {}
        self.ready = False

    async def start(self) -> None:
        """Warm up every served batch size (off the event loop), then start batching and report ready."""
        loop = asyncio.get_running_loop()
        self.warmup_ms = await loop.run_in_executor(None, self.backend.warmup)
        missing = set(self.backend.batch_sizes) - set(self.warmup_ms)
        if missing:
            raise RuntimeError(f"warm-up skipped batch sizes {sorted(missing)}")
        await self.batcher.start()
        b = self.bundle
        self.metrics.set_model(
            name=b.name,
            version=b.version,
            architecture=b.architecture,
            backend=self.backend.kind,
            precision=self.backend.precision,
            device=self.backend.device,
            classes=b.classes,
        )
        self.ready = True
        self.metrics.ready.set(1)
        logger.info(
            "ready: bundle %s %s on %s (%s, %s), %d instance(s); warm-up ms per batch size %s",
            b.name, b.version, self.backend.kind, self.backend.device, self.backend.precision, self.batcher.instances,
            {k: round(v, 2) for k, v in self.warmup_ms.items()},
        )  # fmt: skip

    async def stop(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        await self.batcher.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.backend.close()

    def _prepare(self, data: bytes) -> _Prepared:
        t0 = time.perf_counter()
        spec = self.bundle.input
        img = decode_image(data, max_pixels=self.settings.max_image_pixels)
        lb, info = letterbox(img, (spec.height, spec.width), spec.pad_value)
        x = to_chw(lb, spec)
        return _Prepared(x, info, time.perf_counter() - t0)

    def _postprocess(self, out: npt.NDArray[np.float32], infos: Sequence[LetterboxInfo]) -> list[Detections]:
        """The batcher's ``finish``: one batch's raw outputs -> detections, on the inference thread."""
        pp = self.bundle.postprocess
        return postprocess(
            out,
            infos,
            self._thr,
            nms_iou=pp.nms_iou,
            max_detections=pp.max_detections,
            max_candidates=pp.max_candidates,
        )

    async def inspect(
        self,
        uploads: Sequence[ImageUpload],
        *,
        request_id: str,
        arrival: float,
        camera_id: str | None = None,
        part_id: str | None = None,
    ) -> list[InspectResult]:
        """Run the pipeline for the images of one request. ``arrival`` is ``time.monotonic()`` at request start.

        Raises:
            ImageError (4xx) before anything is queued; Overloaded, DeadlineExceeded, BackendFailure afterwards.
        """
        loop = asyncio.get_running_loop()
        deadline = arrival + self.settings.deadline_ms / 1000.0
        try:
            prepared = await asyncio.gather(*(loop.run_in_executor(self.pool, self._prepare, u.data) for u in uploads))
        except ImageError as exc:
            if len(uploads) > 1:
                exc.message = f"{exc.message} (in one of {len(uploads)} images; the request was not processed)"
            raise
        for p in prepared:
            self.metrics.stage_duration.labels(stage="decode").observe(p.decode_s)
        try:
            results = await self.batcher.submit_many([p.x for p in prepared], deadline, [p.info for p in prepared])
        except DeadlineExceeded:
            self.metrics.timed_out.inc()
            raise
        except BackendFailure:
            self.metrics.failed.labels(reason="backend_error").inc()
            raise
        except PostprocessFailure:
            self.metrics.failed.labels(reason="internal_error").inc()
            raise
        dets: list[Detections] = [r.finished for r in results]
        post_s = max(r.finish_s for r in results)  # post-processing of the batch that held this request's images
        self.metrics.stage_duration.labels(stage="postprocess").observe(post_s)
        self.metrics.images_done(len(results))
        total_ms = (time.monotonic() - arrival) * 1e3
        return [
            self._result(i, u, p, r, d, post_s, total_ms, request_id, camera_id, part_id)
            for i, (u, p, r, d) in enumerate(zip(uploads, prepared, results, dets, strict=True))
        ]

    def _result(
        self,
        index: int,
        upload: ImageUpload,
        prep: _Prepared,
        res: BatchResult,
        dets: Detections,
        post_s: float,
        total_ms: float,
        request_id: str,
        camera_id: str | None,
        part_id: str | None,
    ) -> InspectResult:
        names = self.bundle.classes
        result = verdict(dets, self.verdict_rule, names)
        self.metrics.verdicts.labels(verdict=result).inc()
        detections = []
        for box, score, cid in zip(
            dets.boxes_xyxy.tolist(), dets.scores.tolist(), dets.class_ids.tolist(), strict=True
        ):
            self.metrics.detections.labels(class_name=names[cid]).inc()
            detections.append(Detection(class_id=cid, class_name=names[cid], score=score, box_xyxy=tuple(box)))
        return InspectResult(
            request_id=request_id,
            image_index=index,
            filename=upload.filename,
            camera_id=camera_id,
            part_id=part_id,
            model_name=self.bundle.name,
            model_version=self.bundle.version,
            width=prep.info.src_width,
            height=prep.info.src_height,
            verdict=result,  # type: ignore[arg-type]
            detections=detections,
            batch_size=res.batch_size,
            timings_ms=Timings(
                decode=prep.decode_s * 1e3,
                queue=res.queue_s * 1e3,
                inference=res.inference_s * 1e3,
                postprocess=post_s * 1e3,
                total=total_ms,
            ),
        )

    def model_info(self) -> ModelInfo:
        b = self.bundle
        return ModelInfo(
            name=b.name,
            version=b.version,
            architecture=b.architecture,
            classes=b.classes,
            input_width=b.input.width,
            input_height=b.input.height,
            backend=self.backend.kind,
            backend_reason=self.backend_reason,
            device=self.backend.device,
            precision=self.backend.precision,
            batch_sizes=[s for s in self.backend.batch_sizes if s <= self.batcher.max_batch_size]
            or [min(self.backend.batch_sizes)],
            max_batch_size=self.batcher.max_batch_size,
            instances=self.batcher.instances,
            intra_op_threads=getattr(self.backend, "intra_op_threads", None),
            max_delay_ms=round(self.batcher.max_delay_s * 1000.0, 6),
            score_thresholds=self.thresholds,
            nms_iou=b.postprocess.nms_iou,
            max_detections=b.postprocess.max_detections,
            verdict_rule=self.verdict_rule,
            warmup_ms=self.warmup_ms,
            provenance=b.provenance,
            files=b.files,
        )
