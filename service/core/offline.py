"""Inspection of files without the HTTP service, for ``aoi val`` and ``aoi predict``: the service's own admit, decode,
plan, model-input, post-processing and merge steps (:mod:`service.core.frames`), with fixed-size batches filled across
frames instead of the dynamic batcher. A frame's numbers here are the numbers the service answers for its bytes."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TextIO

import numpy as np
import numpy.typing as npt

from service.core.backend import InferenceBackend
from service.core.bundle import ModelBundle, PostprocessSpec
from service.core.errors import ServiceError
from service.core.frames import (
    DecodedFrame,
    FrameLimits,
    TileInput,
    TilingPolicy,
    admit_frames,
    decode_planned,
    merge_plan,
)
from service.core.postprocess import Detections, postprocess
from service.core.preprocess import fill_input, new_batch

__all__ = ["CountProgress", "FrameInspector", "InspectedFrame"]


@dataclass(frozen=True)
class InspectedFrame:
    key: str  # what the caller named the frame (a file path)
    width: int
    height: int
    tiled: bool
    tiles: int  # model inputs the frame needed
    detections: Detections  # frame pixels, merged, thresholded, capped
    decode_s: float


@dataclass
class _Pending:
    key: str
    decoded: DecodedFrame
    parts: list[Detections | None]

    @property
    def done(self) -> bool:
        return all(p is not None for p in self.parts)


class FrameInspector:
    """Runs a bundle's backend over frames given as bytes, tiled as the service tiles them.

    Args:
        thresholds: ``(nc,)`` per-class score thresholds (the served ones, or the evaluation protocol's 0.001).
        postprocess_spec: NMS IoU and detection cap (the bundle's, or the evaluation protocol's).
        batch_size: model inputs per backend call (tiles of consecutive frames share batches).
    """

    def __init__(
        self,
        bundle: ModelBundle,
        backend: InferenceBackend,
        policy: TilingPolicy,
        thresholds: npt.NDArray[np.float32],
        *,
        postprocess_spec: PostprocessSpec | None = None,
        batch_size: int = 8,
        limits: FrameLimits | None = None,
    ) -> None:
        self.bundle = bundle
        self.backend = backend
        self.policy = policy
        self.thresholds = np.asarray(thresholds, np.float32)
        self.pp = postprocess_spec or bundle.postprocess
        self.limits = limits or FrameLimits()
        self._sizes = sorted(backend.batch_sizes)
        self.batch_size = max(1, min(batch_size, self._sizes[-1]))

    def _infer(self, queue: list[tuple[_Pending, int, TileInput]]) -> None:
        """Run one batch of queued inputs and store each input's detections with its frame."""
        spec = self.bundle.input
        n = len(queue)
        size = next((s for s in self._sizes if s >= n), n)  # a fixed-batch engine needs a full batch
        batch = new_batch(spec, size)
        for i, (_, _, tile) in enumerate(queue):
            fill_input(batch[i], tile.frame, tile.window, spec)
        batch[n:] = batch[n - 1]
        out = self.backend.infer(batch)[:n]
        infos = [p.decoded.infos[k] for p, k, _ in queue]
        dets = postprocess(
            out,
            infos,
            self.thresholds,
            nms_iou=self.pp.nms_iou,
            max_detections=self.pp.max_detections,
            max_candidates=self.pp.max_candidates,
        )
        for (p, k, _), d in zip(queue, dets, strict=True):
            p.parts[k] = d

    def _finish(self, p: _Pending) -> InspectedFrame:
        parts = [d for d in p.parts if d is not None]
        plan = p.decoded.plan
        merged = merge_plan(parts, plan, self.policy, self.pp)
        return InspectedFrame(p.key, plan.width, plan.height, plan.tiled, plan.inputs, merged, p.decoded.decode_s)

    def run(
        self,
        frames: Iterable[tuple[str, bytes]],
        progress: Callable[[int], None] | None = None,
        on_error: Callable[[str, ServiceError], None] | None = None,
    ) -> Iterator[InspectedFrame]:
        """Inspect ``(key, bytes)`` frames in order; yields each frame as soon as all its inputs ran, in input order.

        Args:
            on_error: called with a frame the service would refuse (not an image, truncated, too many pixels or
                tiles), which is then skipped; without it the error is raised.

        Raises:
            ImageError / TooManyTiles: a frame that the service would refuse (the message names the key).
        """
        waiting: list[_Pending] = []
        queue: list[tuple[_Pending, int, TileInput]] = []
        done = 0
        for key, data in frames:
            try:
                (plan,) = admit_frames([data], self.policy, self.limits, [key])
                decoded = decode_planned(data, plan, self.policy, self.limits, self.bundle.input, key)
            except ServiceError as exc:
                if on_error is None:
                    raise
                on_error(key, exc)
                done += 1
                if progress is not None:
                    progress(done)
                continue
            pending = _Pending(key, decoded, [None] * decoded.plan.inputs)
            waiting.append(pending)
            for k, tile in enumerate(decoded.inputs()):
                queue.append((pending, k, tile))
                if len(queue) == self.batch_size:
                    self._infer(queue)
                    queue = []
            while waiting and waiting[0].done:
                done += 1
                yield self._finish(waiting.pop(0))
                if progress is not None:
                    progress(done)
        if queue:
            self._infer(queue)
        for p in waiting:
            done += 1
            yield self._finish(p)
            if progress is not None:
                progress(done)


class CountProgress:
    """``label done/total (rate/s, ETA)`` on stderr: redrawn in place on a terminal, a plain line every
    ``every_s`` seconds otherwise (CI logs, ``nohup``), and a last line when the count completes."""

    def __init__(self, label: str, total: int, *, stream: TextIO | None = None, every_s: float = 5.0) -> None:
        self.label, self.total, self.every_s = label, total, every_s
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = self._last = time.monotonic()
        self._finished = False

    def finish(self) -> None:
        """The last line, if the count has not printed it yet (items skipped before reaching the counter)."""
        self(self.total)

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        last = done >= self.total
        if self._finished or (not last and now - self._last < (0.2 if self.tty else self.every_s)):
            return
        self._finished = last
        self._last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        line = f"{self.label} {done}/{self.total} ({rate:.1f}/s, {now - self.start:.0f} s, ETA {eta:.0f} s)"
        self.stream.write(("\r" + line + ("\n" if last else "")) if self.tty else line + "\n")
        self.stream.flush()
