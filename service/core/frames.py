"""The per-frame steps shared by the service (:mod:`service.inference.pipeline`) and ``aoi val`` / ``aoi predict``
(:mod:`service.core.offline`): admit a frame from its header (plan + limits, before any decode), decode it into the
pixels its plan needs, turn its windows into batch rows, and merge the windows' detections. One implementation of each,
so what ``aoi val`` scores is what the service answers.

Plan stage: which windows of a frame the model sees.

A frame larger than the model's native field is cut into overlapping tiles at the scale the model was trained at
(the bundle's ``tiling``, SAHI's slicing idea); any other frame is letterboxed whole. Pure Python, and computable from
the image header alone, so tile limits are checked before decoding; the service, ``aoi val`` and ``aoi predict`` all
plan with :func:`plan_frame`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from service.core.bundle import InputSpec, ModelBundle, PostprocessSpec, TilingSpec
from service.core.errors import ImageTooLarge, ImageTooThin, RequestTooCostly, TooManyTiles
from service.core.postprocess import Detections, merge_frame
from service.core.preprocess import Frame, LetterboxInfo, Window, decode_frame, fill_input, probe_image, window_info

__all__ = [
    "AUTO_MARGIN",
    "DecodedFrame",
    "FrameLimits",
    "FramePlan",
    "TileInput",
    "TilingMode",
    "TilingPolicy",
    "TilingSettings",
    "admit_frames",
    "assemble_rows",
    "axis_starts",
    "decode_planned",
    "merge_plan",
    "plan_frame",
    "resolve_policy",
]


# auto tiles a frame when a side exceeds the native field by more than this: a frame up to 1.25x the field is
# letterboxed whole, so the model sees it at >= 0.8x its native scale (one tile per 200 px NEU-DET image, not four).
AUTO_MARGIN = 1.25


TilingMode = Literal["auto", "on", "off"]


class TilingSettings(BaseModel):
    """Deployment overrides of the bundle's tiling (``tiling:`` in YAML, ``AOI_TILING__MODE=on``), and the limits
    that keep one frame from taking the service. None = the bundle's value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: TilingMode | None = Field(
        default=None, description="auto: tile frames larger than the native field; on: always; off: letterbox whole"
    )
    native_tile: int | None = Field(
        default=None, gt=0, description="frame pixels across one model input (a camera whose optics differ)"
    )
    overlap: float | None = Field(default=None, ge=0.0, le=0.75, description="minimum overlap, fraction of a tile")
    full_frame: bool | None = Field(default=None, description="also run the whole frame, for defects over a tile")
    match_iou: float | None = Field(default=None, gt=0.0, le=1.0, description="IoU in the shared window to join")
    max_tiles_per_frame: int = Field(default=1024, ge=1, description="model inputs one frame may need -> 413")
    max_tiles_per_request: int = Field(default=2048, ge=1, description="model inputs one request may need -> 413")
    min_tile_fill: float = Field(
        default=0.125,
        ge=0.0,
        le=1.0,
        description="frame pixels per tile of a tiled frame, at least this share of a tile, else 422 image_too_thin "
        "(a 1 x 20000 strip would cost 133 model inputs for 20,000 pixels); 0 = no check",
    )
    max_detections: int = Field(
        default=5000,
        ge=1,
        description="detection cap of a tiled frame (each tile keeps the bundle's cap; a 5 MP steel frame can hold "
        "hundreds of defects, more than a single image's 300)",
    )
    deadline_ms: float = Field(
        default=30000.0,
        gt=0.0,
        description="deadline of a request holding a tiled frame (a 5 MP frame is ~224 model inputs: about 2 s on "
        "2 CPU cores, 0.1 s on a GPU); requests of untiled images keep deadline_ms",
    )


@dataclass(frozen=True)
class TilingPolicy:
    """How frames are planned, resolved from bundle, settings and request (:func:`resolve_policy`).

    ``tile_width`` x ``tile_height``: frame pixels per model input at the native scale (None when no native scale is
    known: then ``auto`` never tiles, ``on`` uses the model input size).
    """

    mode: TilingMode
    tile_width: int | None
    tile_height: int | None
    overlap: float  # minimum overlap of neighbouring tiles, fraction of a tile side
    full_frame: bool  # add a whole-frame letterboxed pass to tiled frames
    match_iou: float  # merge: IoU of two detections' parts inside the windows' shared region to join them
    input_width: int
    input_height: int
    source: str  # where the geometry came from, for /v1/model and logs
    max_detections: int = 5000  # cap of a tiled frame's merged detections (a frame letterboxed whole: the bundle's)

    def tile_size(self) -> tuple[int, int]:
        if self.tile_width is None or self.tile_height is None:
            return self.input_width, self.input_height
        return self.tile_width, self.tile_height

    def tiles(self, width: int, height: int) -> bool:
        """Whether a ``width`` x ``height`` frame is tiled under this policy."""
        if self.mode == "off" or (self.mode == "auto" and self.tile_width is None):
            return False
        if self.mode == "on":
            return True
        tw, th = self.tile_size()
        return width > AUTO_MARGIN * tw or height > AUTO_MARGIN * th


@dataclass(frozen=True)
class FramePlan:
    """The model inputs of one frame: tiles in row-major order, then the whole frame when a full-frame pass runs.
    A frame that is not tiled has exactly one window, the whole frame."""

    width: int
    height: int
    windows: tuple[Window, ...]
    tiled: bool

    @property
    def inputs(self) -> int:
        return len(self.windows)


def axis_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles along one axis: the fewest tiles of side ``tile`` that cover ``length`` with
    neighbours sharing at least ``overlap * tile`` pixels, spread evenly so the first starts at 0 and the last ends
    at ``length`` (no tile hangs over the edge). A side no longer than a tile gets one window of its own length."""
    if length <= tile:
        return [0]
    shared = min(math.ceil(overlap * tile - 1e-9), tile - 1)  # whole pixels: rounded starts keep the overlap
    n = math.ceil((length - shared) / (tile - shared) - 1e-9)
    n = max(n, 2)
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def plan_frame(width: int, height: int, policy: TilingPolicy) -> FramePlan:
    """Plan one ``width`` x ``height`` frame (original pixels)."""
    whole: Window = (0, 0, width, height)
    if not policy.tiles(width, height):
        return FramePlan(width, height, (whole,), tiled=False)
    tw, th = policy.tile_size()
    xs, ys = axis_starts(width, tw, policy.overlap), axis_starts(height, th, policy.overlap)
    windows = [(x, y, min(x + tw, width), min(y + th, height)) for y in ys for x in xs]
    if policy.full_frame and len(windows) > 1:
        windows.append(whole)
    return FramePlan(width, height, tuple(windows), tiled=True)


def resolve_policy(
    bundle: ModelBundle, settings: TilingSettings, request_mode: TilingMode | None = None
) -> TilingPolicy:
    """The tiling in force: the request's mode over the settings over the bundle's ``tiling``.

    ``settings.native_tile`` sets the tile width in frame pixels (the height follows the model input's aspect); a
    bundle without ``tiling`` (exported before native scales were recorded) has no native scale unless it is set.
    """
    spec = bundle.tiling
    iw, ih = bundle.input.width, bundle.input.height
    tile_w: int | None
    tile_h: int | None
    if settings.native_tile is not None:
        tile_w, tile_h = settings.native_tile, max(1, round(settings.native_tile * ih / iw))
        source = f"settings tiling.native_tile = {settings.native_tile}"
    elif spec is not None:
        tile_w, tile_h, source = spec.tile_width, spec.tile_height, spec.source or "bundle.json tiling"
    else:
        tile_w = tile_h = None
        source = "bundle has no native scale (exported before tiling): frames are letterboxed whole unless tiling is on"
    mode = request_mode or settings.mode or (spec.mode if spec is not None else "auto")
    # Unset settings take the bundle's values; a bundle without tiling has TilingSpec's defaults.
    defaults = TilingSpec.model_fields
    base_overlap = spec.overlap if spec else defaults["overlap"].default
    base_full = spec.full_frame if spec else defaults["full_frame"].default
    base_match = spec.match_iou if spec else defaults["match_iou"].default
    return TilingPolicy(
        mode=mode,
        tile_width=tile_w,
        tile_height=tile_h,
        overlap=settings.overlap if settings.overlap is not None else base_overlap,
        full_frame=settings.full_frame if settings.full_frame is not None else base_full,
        match_iou=settings.match_iou if settings.match_iou is not None else base_match,
        max_detections=settings.max_detections,
        input_width=iw,
        input_height=ih,
        source=source,
    )


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


def assemble_rows(spec: InputSpec) -> Callable[[Sequence[TileInput], npt.NDArray[Any]], None]:
    """The batcher's ``assemble`` for :class:`TileInput` items: each window letterboxed straight into its row (float32
    NCHW rows, or uint8 NHWC rows for a bundle whose graph normalises its input: :func:`new_batch` allocates them)."""

    def assemble(inputs: Sequence[TileInput], batch: npt.NDArray[Any]) -> None:
        for i, t in enumerate(inputs):
            fill_input(batch[i], t.frame, t.window, spec)

    return assemble


def merge_plan(parts: Sequence[Detections], plan: FramePlan, policy: TilingPolicy, pp: PostprocessSpec) -> Detections:
    """The frame's detections: its windows' detections merged (a single window passes through, capped). A tiled
    frame is capped at ``policy.max_detections``, a frame letterboxed whole at the bundle's (``pp``) cap."""
    cap = policy.max_detections if plan.tiled else pp.max_detections
    return merge_frame(parts, plan.windows, match_iou=policy.match_iou, nms_iou=pp.nms_iou, max_detections=cap)
