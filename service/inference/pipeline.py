"""The inspection pipeline behind the routes, one line of stages (docs/service.md, "Request path"): admit (plans and
limits from the headers) -> decode (thread pool) -> dynamic batch (tiles of every frame, rows built on the inference
thread) -> post-process per window -> merge per frame -> verdict, with the stage metrics. One
:class:`InspectionService` per app, built in the lifespan."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import PurePosixPath
from typing import Any

from service.core.errors import (
    BackendFailure,
    DeadlineExceeded,
    ImageError,
    PostprocessFailure,
    RequestTooCostly,
)
from service.core.frames import (
    DecodedFrame,
    FrameLimits,
    FramePlan,
    TilingMode,
    TilingPolicy,
    admit_frames,
    decode_planned,
    merge_plan,
)
from service.core.postprocess import Detections, verdict
from service.core.results import Detection, InspectResult, ModelInfo, SwapInfo, TilingInfo, Timings
from service.inference.admission import Admission
from service.inference.batching import BatchResult
from service.inference.metrics import FrameReport, SlidingRate, StageObserver
from service.inference.serving import ModelSlot, ServingModel, effective_thresholds
from service.inference.threads import lower_thread_priority
from service.records.store import RecordStage
from service.settings import Settings

__all__ = ["ImageUpload", "InspectionService", "effective_thresholds"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageUpload:
    data: bytes
    filename: str | None = None


class _Dropped(Exception):
    """An image of a request that had already failed or lost its client: not decoded (never reaches the client)."""


@dataclass
class _DecodeGate:
    """Checked by each decode job of a request before it starts (on a decode thread), so an image is not decoded
    once its request cannot be answered any more."""

    deadline: float  # the request's deadline (monotonic)
    max_decode_s: float  # decode time the request may take, from the start of its first image (max_decode_ms)
    started: float | None = None
    cancelled: bool = False  # another image failed, or the client went away

    def decode(self, job: Callable[[], DecodedFrame]) -> DecodedFrame:
        now = time.monotonic()
        if self.cancelled:
            raise _Dropped
        if self.started is None:
            self.started = now
        if now >= self.deadline:
            self.cancelled = True
            raise DeadlineExceeded("deadline passed while the request waited to be decoded")
        if now - self.started > self.max_decode_s:
            self.cancelled = True
            raise RequestTooCostly(
                f"decoding the request's images took over {self.max_decode_s * 1e3:.0f} ms (setting max_decode_ms); "
                "send fewer or smaller images per request"
            )
        try:
            return job()
        except BaseException:
            self.cancelled = True
            raise


def _decode_and_digest(
    data: bytes, plan: FramePlan | None, policy: TilingPolicy, limits: FrameLimits, spec: Any, label: str
) -> DecodedFrame:
    """:func:`decode_planned` plus the sha256 of the upload, on the decode thread (the record names the image by
    it; hashing a 20 MB frame takes tens of milliseconds, not for the event loop)."""
    frame = decode_planned(data, plan, policy, limits, spec, label)
    return dataclasses.replace(frame, sha256=hashlib.sha256(data).hexdigest())


@dataclass(frozen=True)
class _FrameOutcome:
    """One frame after inference: merged detections and how its inputs got through."""

    dets: Detections
    queue_s: float  # longest wait of its inputs
    inference_s: float  # its batches' backend calls, added up
    postprocess_s: float  # its batches' post-processing, added up
    merge_s: float
    batch_size: int  # largest batch that held one of its inputs
    batches: int


def _frame_report(
    frame: DecodedFrame, out: _FrameOutcome, result: str, class_names: list[str], total_ms: float
) -> FrameReport:
    """What the metrics hear of one answered frame."""
    plan = frame.plan
    tiled_stages = {"decode": frame.decode_s, "queue": out.queue_s, "inference": out.inference_s,
                    "merge": out.merge_s, "total": total_ms / 1e3}  # fmt: skip
    return FrameReport(
        verdict=result,
        inputs=plan.inputs,
        megapixels=plan.width * plan.height / 1e6,
        postprocess_s=out.postprocess_s,
        merge_s=out.merge_s,
        tiled_stages=tiled_stages if plan.tiled else None,
        class_names=class_names,
    )


def _without_host_paths(value: Any) -> Any:
    """``value`` with every absolute file path replaced by its last part: bundles exported before 1.3 recorded the
    build machine's folders, and /v1/model is no place to show them."""
    if isinstance(value, dict):
        return {k: _without_host_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_host_paths(v) for v in value]
    if isinstance(value, str) and (value.startswith("/") or (len(value) > 2 and value[1:3] in (":\\", ":/"))):
        return PurePosixPath(value.replace("\\", "/")).name
    return value


class InspectionService:
    """Everything a request needs, created once per app from settings, bundle and the chosen backend."""

    def __init__(
        self,
        settings: Settings,
        slot: ModelSlot,
        metrics: StageObserver,
        *,
        recorder: RecordStage | None = None,
    ) -> None:
        """``slot``: the live model (each request binds to ``slot.model`` when admitted). ``recorder``: the record
        stage (records and signals; None: nothing is recorded)."""
        self.settings = settings
        self.metrics = metrics
        self.slot = slot
        self.recorder = recorder if recorder is not None and recorder.active else None
        self.limits = FrameLimits(
            max_pixels=settings.max_image_pixels,
            max_tiles_per_frame=settings.tiling.max_tiles_per_frame,
            max_tiles_per_request=settings.tiling.max_tiles_per_request,
            max_request_pixels=settings.max_request_pixels,
            min_tile_fill=settings.tiling.min_tile_fill,
        )
        self.pool = ThreadPoolExecutor(
            max_workers=settings.decode_workers,
            thread_name_prefix="aoi-decode",
            initializer=lower_thread_priority(settings.worker_niceness),
        )
        self._inputs_done = SlidingRate(10.0)  # model inputs answered, for Retry-After
        self.admission = Admission(
            slot.model.batcher,
            decode_queue_images=settings.decode_queue_images,
            by_deadline=settings.admit_by_deadline,
            deadline_s=settings.deadline_ms / 1000.0,
            answered=self._inputs_done,
            max_inflight_pixels=settings.max_inflight_pixels,
        )
        slot.on_replace(self._follow)
        self.admitted_inputs = 0  # model inputs admitted since start (the idle trim watches it move)
        self.ready = False

    @property
    def model(self) -> ServingModel:
        """The live model: what a request admitted now is bound to."""
        return self.slot.model

    def _follow(self, model: ServingModel) -> None:
        self.admission.batcher = model.batcher

    @property
    def idle(self) -> bool:
        """Nothing queued, batched or decoding."""
        return self.model.batcher.idle and self.admission.decoding_images == 0

    def set_ready(self, ready: bool) -> None:
        self.ready = ready
        self.metrics.set_ready(ready)

    def begin_stop(self) -> None:
        """SIGTERM, once the server drained its open connections (``service/cli/server.py``; flags only): /readyz
        turns 503 and new requests get 503 ``shutting_down`` while the admitted ones are answered; the lifecycle's
        stop follows once they are."""
        self.admission.stopping = True
        self.set_ready(False)

    def close(self) -> None:
        """Not ready any more, and the decode threads told to end (the model is the lifecycle's to stop)."""
        self.set_ready(False)
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def inspect(
        self,
        uploads: Sequence[ImageUpload],
        *,
        request_id: str,
        arrival: float,
        camera_id: str | None = None,
        part_id: str | None = None,
        tiling: TilingMode | None = None,
    ) -> list[InspectResult]:
        """Run the pipeline for the images of one request. ``arrival`` is ``time.monotonic()`` at request start;
        ``tiling`` overrides the tiling mode for this request.

        Raises:
            ImageError / TooManyTiles / RequestTooCostly (4xx) and Overloaded (503) before anything is decoded or
            queued; DeadlineExceeded, RequestTooCostly (decode time), BackendFailure afterwards.
        """
        model = self.model  # fixed for this request: a live swap changes what later requests get
        policy = model.policies[tiling] if tiling is not None else model.tiling
        labels = [self._label(i, u, len(uploads)) for i, u in enumerate(uploads)]
        plans = admit_frames([u.data for u in uploads], policy, self.limits, labels)  # 4xx here: nothing decoded
        tiled = any(p is not None and p.tiled for p in plans)
        deadline = arrival + (self.settings.tiling.deadline_ms if tiled else self.settings.deadline_ms) / 1000.0
        need = sum(p.inputs if p is not None else 1 for p in plans)
        pixels = sum(p.width * p.height for p in plans if p is not None)
        self.admission.check(need, len(uploads), arrival, deadline, pixels)  # 503 here: nothing decoded either
        self.admitted_inputs += need
        model.acquire()
        try:
            with self.admission.hold_pixels(pixels):  # until answered: what its decoded frames hold
                frames = await self._decode_admitted(model, uploads, plans, policy, labels, need, arrival, deadline)
                outcomes = await self._infer(model, frames, policy, deadline)
        finally:
            model.release()
        self._inputs_done.add(need)
        total_ms = (time.monotonic() - arrival) * 1e3
        results = [
            self._result(model, i, u, f, o, total_ms, request_id, camera_id, part_id)
            for i, (u, f, o) in enumerate(zip(uploads, frames, outcomes, strict=True))
        ]
        if self.recorder is not None:  # durable: on disk before the answer
            received_at = time.time() - (time.monotonic() - arrival)
            await self.recorder.record(
                model, results, [u.data for u in uploads], [f.sha256 for f in frames], received_at
            )
        return results

    async def smoke(self, model: ServingModel, data: bytes) -> InspectResult:
        """Answer ``data`` with ``model`` through the request path (plan, decode, batch, merge, verdict), outside
        admission and the metrics: a new bundle's check before it serves.

        Raises:
            whatever the path raises for this image and model (ImageError for a bad smoke image, BackendFailure).
        """
        arrival = time.monotonic()
        uploads = [ImageUpload(data, "smoke")]
        plans = admit_frames([data], model.tiling, self.limits, ["smoke image"])
        deadline = arrival + self.settings.tiling.deadline_ms / 1000.0
        gate = _DecodeGate(deadline, self.settings.max_decode_ms / 1000.0)
        frames = await self._decode(model, uploads, plans, model.tiling, ["smoke image"], gate, observe=False)
        outcomes = await self._infer(model, frames, model.tiling, deadline, observe=False)
        return self._result(model, 0, uploads[0], frames[0], outcomes[0], 0.0, "smoke", None, None, observe=False)

    async def _decode_admitted(
        self,
        model: ServingModel,
        uploads: Sequence[ImageUpload],
        plans: Sequence[FramePlan | None],
        policy: TilingPolicy,
        labels: list[str],
        need: int,
        arrival: float,
        deadline: float,
    ) -> list[DecodedFrame]:
        gate = _DecodeGate(deadline, self.settings.max_decode_ms / 1000.0)
        with self.admission.hold(need, len(uploads)):  # until its inputs are in the batcher's queue
            try:
                frames = await self._decode(model, uploads, plans, policy, labels, gate)
            except DeadlineExceeded:
                self.metrics.request_timed_out()
                raise
            if time.monotonic() >= deadline:  # do not queue work nobody waits for any more
                self.metrics.request_timed_out()
                raise DeadlineExceeded(f"deadline passed while decoding ({(time.monotonic() - arrival) * 1e3:.0f} ms)")
        return frames

    @staticmethod
    def _label(index: int, upload: ImageUpload, count: int) -> str:
        if count == 1:
            return "image"
        return f"image {upload.filename or '#' + str(index)} ({index + 1} of {count})"

    async def _decode(
        self,
        model: ServingModel,
        uploads: Sequence[ImageUpload],
        plans: Sequence[FramePlan | None],
        policy: TilingPolicy,
        labels: list[str],
        gate: _DecodeGate,
        *,
        observe: bool = True,
    ) -> list[DecodedFrame]:
        """Decode the request's images on the decode threads. The first failure (or the client leaving) stops the
        images not started yet; this returns only when none of the request's images is being decoded any more, so
        the decode stage's count stays true."""
        loop = asyncio.get_running_loop()
        spec = model.bundle.input
        decode = _decode_and_digest if self.recorder is not None and observe else decode_planned
        plan = plans[0]
        if len(uploads) == 1 and plan is not None and plan.width * plan.height <= self.settings.decode_inline_pixels:
            # One small image: decoding it here costs less than the two thread hops (docs/measurements.md, M7).
            frame = gate.decode(partial(decode, uploads[0].data, plan, policy, self.limits, spec, labels[0]))
            if observe:
                self.metrics.frame_decoded(frame.decode_s)
            return [frame]
        jobs = [
            loop.run_in_executor(self.pool, gate.decode, partial(decode, u.data, p, policy, self.limits, spec, label))
            for u, p, label in zip(uploads, plans, labels, strict=True)
        ]
        try:
            done = await asyncio.gather(*jobs, return_exceptions=True)
        except asyncio.CancelledError:  # the client went away: images not started are dropped
            gate.cancelled = True
            raise
        errors = [(i, r) for i, r in enumerate(done) if isinstance(r, BaseException) and not isinstance(r, _Dropped)]
        if errors:
            i, exc = errors[0]
            if isinstance(exc, ImageError) and len(uploads) > 1:
                exc.message = f"{labels[i]}: {exc.message} (the request was not processed)"
            raise exc
        frames = [r for r in done if isinstance(r, DecodedFrame)]
        for f in frames if observe else ():
            self.metrics.frame_decoded(f.decode_s)
        return frames

    async def _infer(
        self,
        model: ServingModel,
        frames: Sequence[DecodedFrame],
        policy: TilingPolicy,
        deadline: float,
        *,
        observe: bool = True,
    ) -> list[_FrameOutcome]:
        inputs = [t for f in frames for t in f.inputs()]
        infos = [i for f in frames for i in f.infos]
        try:
            results = await model.batcher.submit_many(inputs, deadline, infos)
        except DeadlineExceeded:
            if observe:
                self.metrics.request_timed_out()
            raise
        except (BackendFailure, PostprocessFailure) as exc:
            if observe:
                self.metrics.request_failed("backend_error" if isinstance(exc, BackendFailure) else "internal_error")
            raise
        outcomes, start = [], 0
        loop = asyncio.get_running_loop()
        for f in frames:
            mine = results[start : start + f.plan.inputs]
            start += f.plan.inputs
            if f.plan.inputs > 1:  # off the event loop: merging hundreds of tiles takes milliseconds
                outcomes.append(await loop.run_in_executor(self.pool, self._outcome, model, f, mine, policy))
            else:
                outcomes.append(self._outcome(model, f, mine, policy))
        if observe:
            self.metrics.frames_inferred(len(frames), len(results))
        return outcomes

    @staticmethod
    def _outcome(
        model: ServingModel, frame: DecodedFrame, results: Sequence[BatchResult], policy: TilingPolicy
    ) -> _FrameOutcome:
        t0 = time.perf_counter()
        dets = merge_plan([r.finished for r in results], frame.plan, policy, model.bundle.postprocess)
        merge_s = time.perf_counter() - t0
        batches = {r.batch_id: r for r in results}
        return _FrameOutcome(
            dets=dets,
            queue_s=max(r.queue_s for r in results),
            inference_s=sum(r.inference_s for r in batches.values()),
            postprocess_s=sum(r.finish_s for r in batches.values()),
            merge_s=merge_s,
            batch_size=max(r.batch_size for r in results),
            batches=len(batches),
        )

    def _result(
        self,
        model: ServingModel,
        index: int,
        upload: ImageUpload,
        frame: DecodedFrame,
        out: _FrameOutcome,
        total_ms: float,
        request_id: str,
        camera_id: str | None,
        part_id: str | None,
        *,
        observe: bool = True,
    ) -> InspectResult:
        names = model.bundle.classes
        dets, plan = out.dets, frame.plan
        result = verdict(dets, model.verdict_rule, names)
        # Our own values, typed by construction (Python ints, floats, strs from .tolist()): built without pydantic's
        # validation, which cost more per frame than serialising them.
        detections = [
            Detection.model_construct(class_id=cid, class_name=names[cid], score=score, box_xyxy=tuple(box))
            for box, score, cid in zip(
                dets.boxes_xyxy.tolist(), dets.scores.tolist(), dets.class_ids.tolist(), strict=True
            )
        ]
        if observe:
            self.metrics.frame_answered(_frame_report(frame, out, result, [d.class_name for d in detections], total_ms))
        return InspectResult.model_construct(
            request_id=request_id,
            image_index=index,
            filename=upload.filename,
            camera_id=camera_id,
            part_id=part_id,
            model_name=model.bundle.name,
            model_version=model.version,
            width=plan.width,
            height=plan.height,
            verdict=result,
            detections=detections,
            batch_size=out.batch_size,
            tiling=TilingInfo.model_construct(tiled=plan.tiled, tiles=plan.inputs, batches=out.batches),
            timings_ms=Timings.model_construct(
                decode=frame.decode_s * 1e3,
                queue=out.queue_s * 1e3,
                inference=out.inference_s * 1e3,
                postprocess=out.postprocess_s * 1e3,
                merge=out.merge_s * 1e3,
                total=total_ms,
            ),
        )

    def _tiling_info(self, t: TilingPolicy) -> dict[str, object]:
        tw, th = t.tile_size()
        return {
            "mode": t.mode,
            "native_scale_known": t.tile_width is not None,
            "tile_width": tw,
            "tile_height": th,
            "native_scale": round(t.input_width / tw, 4),
            "overlap": t.overlap,
            "full_frame": t.full_frame,
            "match_iou": t.match_iou,
            "max_detections": t.max_detections,
            "source": t.source,
            "max_tiles_per_frame": self.limits.max_tiles_per_frame,
            "max_tiles_per_request": self.limits.max_tiles_per_request,
        }

    def model_info(self, swaps: Sequence[SwapInfo] = ()) -> ModelInfo:
        """The live model as ``GET /v1/model`` shows it; ``swaps``: the swap history, oldest first."""
        m = self.model
        b, backend, batcher = m.bundle, m.backend, m.batcher
        return ModelInfo(
            name=b.name,
            version=b.version,
            architecture=b.architecture,
            classes=b.classes,
            input_width=b.input.width,
            input_height=b.input.height,
            backend=backend.kind,
            backend_reason=m.backend_reason,
            device=backend.device,
            precision=backend.precision,
            batch_sizes=[s for s in backend.batch_sizes if s <= batcher.max_batch_size] or [min(backend.batch_sizes)],
            max_batch_size=batcher.max_batch_size,
            instances=batcher.instances,
            intra_op_threads=getattr(backend, "intra_op_threads", None),
            max_delay_ms=round(batcher.max_delay_s * 1000.0, 6),
            score_thresholds=m.thresholds,
            nms_iou=b.postprocess.nms_iou,
            max_detections=b.postprocess.max_detections,
            verdict_rule=m.verdict_rule,
            tiling=self._tiling_info(m.tiling),
            warmup_ms=m.warmup_ms,
            provenance=_without_host_paths(b.provenance),
            files=b.files,
            bundle_hash=m.hash,
            loaded_at=datetime.fromtimestamp(m.loaded_at, UTC).isoformat(timespec="seconds"),
            swaps=list(swaps),
        )
