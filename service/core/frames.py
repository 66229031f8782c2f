"""The per-frame steps shared by the service (:mod:`service.inference.pipeline`) and ``aoi val`` / ``aoi predict``
(:mod:`service.core.offline`): admit a frame from its header (plan + limits, before any decode), decode it into the
pixels its plan needs, turn its windows into batch rows, and merge the windows' detections. One implementation of each,
so what ``aoi val`` scores is what the service answers."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.core.bundle import InputSpec, PostprocessSpec
from service.core.errors import ImageTooLarge, ImageTooThin, RequestTooCostly, TooManyTiles
from service.core.merge import merge_frame
from service.core.postprocess import Detections
from service.core.preprocess import Frame, LetterboxInfo, Window, decode_frame, fill_input, probe_image, window_info
from service.core.tiling import FramePlan, TilingPolicy, plan_frame

__all__ = ["DecodedFrame", "FrameLimits", "TileInput", "admit_frames", "assemble_rows", "decode_planned", "merge_plan"]


@dataclass(frozen=True)
class FrameLimits:
    """What one frame and one request may cost; each refusal names the setting that raises it."""

    max_pixels: int = 40_000_000
    max_tiles_per_frame: int = 1024
    max_tiles_per_request: int = 2048
    max_request_pixels: int = 160_000_000
    min_tile_fill: float = 0.125  # frame pixels per tiled input, at least this share of a tile (0: no check)


@dataclass(frozen=True)
class TileInput:
    """One model input: a window of a decoded frame (the batcher's item; pixels are read only when its batch is
    built)."""

    frame: Frame
    window: Window


@dataclass(frozen=True)
class DecodedFrame:
    frame: Frame
    plan: FramePlan
    infos: tuple[LetterboxInfo, ...]  # one per window: model-input pixels -> frame pixels
    decode_s: float
    sha256: str = ""  # of the uploaded bytes, when the service records them (computed on the decode thread)

    def inputs(self) -> list[TileInput]:
        return [TileInput(self.frame, w) for w in self.plan.windows]


def _check_frame(plan: FramePlan, policy: TilingPolicy, limits: FrameLimits, label: str) -> None:
    if plan.inputs > limits.max_tiles_per_frame:
        raise TooManyTiles(
            f"{label}: {plan.width}x{plan.height} needs {plan.inputs} tiles, over the limit of "
            f"{limits.max_tiles_per_frame} per frame (setting tiling.max_tiles_per_frame)"
        )
    if plan.inputs == 1:  # one input whatever its size: nothing to amplify
        return
    tw, th = policy.tile_size()
    fill = plan.width * plan.height / (plan.inputs * tw * th)
    if fill < limits.min_tile_fill:
        raise ImageTooThin(
            f"{label}: {plan.width}x{plan.height} would be cut into {plan.inputs} tiles of {tw}x{th} frame pixels "
            f"holding {fill:.1%} of a tile each on average, under the minimum of {limits.min_tile_fill:.1%} "
            "(setting tiling.min_tile_fill): a strip this thin is mostly padding; send the frame it was cut from"
        )


def admit_frames(
    datas: Sequence[bytes], policy: TilingPolicy, limits: FrameLimits, labels: Sequence[str] | None = None
) -> list[FramePlan | None]:
    """Plan every frame of a request from its header alone and check the limits, before anything is decoded.

    Returns one plan per frame (None when the header does not state the size, a rare TIFF: that frame is planned and
    checked after decoding).

    Raises:
        ImageError subclasses for a header that is not an image or states too many pixels; RequestTooCostly for
        more pixels in the request than ``max_request_pixels``; TooManyTiles.
    """
    labels = labels or [f"image {i}" for i in range(len(datas))]
    plans: list[FramePlan | None] = []
    for data, label in zip(datas, labels, strict=True):
        _, width, height = probe_image(data)
        if width is None or height is None:
            plans.append(None)
            continue
        if width * height > limits.max_pixels:
            raise ImageTooLarge(
                f"{label} is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels} "
                "(setting max_image_pixels)"
            )
        plan = plan_frame(width, height, policy) if width and height else None
        if plan is not None:
            _check_frame(plan, policy, limits, label)
        plans.append(plan)
    pixels = sum(p.width * p.height for p in plans if p is not None)
    if pixels > limits.max_request_pixels:
        raise RequestTooCostly(
            f"the request's {len(datas)} images hold {pixels} pixels, over the limit of {limits.max_request_pixels} "
            "per request (setting max_request_pixels); send fewer or smaller images per request"
        )
    total = sum(p.inputs for p in plans if p is not None)
    if total > limits.max_tiles_per_request:
        raise TooManyTiles(
            f"the request's {len(datas)} images need {total} tiles, over the limit of {limits.max_tiles_per_request} "
            "per request (setting tiling.max_tiles_per_request); send fewer images per request"
        )
    return plans


def decode_planned(
    data: bytes, plan: FramePlan | None, policy: TilingPolicy, limits: FrameLimits, spec: InputSpec, label: str = ""
) -> DecodedFrame:
    """Decode one admitted frame. A frame letterboxed whole is decoded by a JPEG codec straight at a reduced size
    when it is much larger than the model input; a tiled frame at full size."""
    t0 = time.perf_counter()
    out_hw = (spec.height, spec.width)
    frame = decode_frame(data, max_pixels=limits.max_pixels, reduce_to=out_hw if plan and not plan.tiled else None)
    if plan is None:
        plan = plan_frame(frame.width, frame.height, policy)
        _check_frame(plan, policy, limits, label or "image")
    infos = tuple(window_info(frame, w, out_hw) for w in plan.windows)
    return DecodedFrame(frame, plan, infos, time.perf_counter() - t0)


def assemble_rows(spec: InputSpec) -> Callable[[Sequence[TileInput], npt.NDArray[np.float32]], None]:
    """The batcher's ``assemble`` for :class:`TileInput` items: each window letterboxed straight into its row."""

    def assemble(inputs: Sequence[TileInput], batch: npt.NDArray[np.float32]) -> None:
        for i, t in enumerate(inputs):
            fill_input(batch[i], t.frame, t.window, spec)

    return assemble


def merge_plan(parts: Sequence[Detections], plan: FramePlan, policy: TilingPolicy, pp: PostprocessSpec) -> Detections:
    """The frame's detections: its windows' detections merged (a single window passes through, capped). A tiled
    frame is capped at ``policy.max_detections``, a frame letterboxed whole at the bundle's (``pp``) cap."""
    cap = policy.max_detections if plan.tiled else pp.max_detections
    return merge_frame(parts, plan.windows, match_iou=policy.match_iou, nms_iou=pp.nms_iou, max_detections=cap)
