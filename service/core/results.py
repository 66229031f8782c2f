"""What an inspection answers, as data: per-image results (detections, verdict, timings, tiling) and the serving
model's description. Built by the pipeline, stored by the records, returned by the HTTP API as they are (pydantic
models: they generate the OpenAPI document)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from service.core.bundle import VerdictRule

__all__ = ["Detection", "InspectResult", "ModelInfo", "SwapInfo", "TilingInfo", "Timings"]


class Detection(BaseModel):
    class_id: int
    class_name: str
    score: float = Field(ge=0.0, le=1.0)
    box_xyxy: tuple[float, float, float, float] = Field(description="x1, y1, x2, y2 in original-image pixels")


class Timings(BaseModel):
    """Milliseconds spent in each stage for this image. ``queue`` is the longest wait of its model inputs;
    ``inference`` and ``postprocess`` add up the whole batches that held its inputs (other images' inputs in those
    batches included); ``merge`` joins its tiles' detections; ``total`` is arrival to response for the whole
    request."""

    decode: float
    queue: float
    inference: float
    postprocess: float
    merge: float = 0.0
    total: float


class TilingInfo(BaseModel):
    """How the image reached the model: letterboxed whole (``tiled`` false, 1 input) or cut into tiles at the
    model's native scale (plus the whole frame when the full-frame pass is on)."""

    tiled: bool
    tiles: int = Field(description="model inputs this image needed (tiles, + 1 for a full-frame pass)")
    batches: int = Field(description="inference batches those inputs ran in (shared with other images)")


class InspectResult(BaseModel):
    request_id: str
    image_index: int = Field(description="position of the image in the request (0 for a raw body)")
    filename: str | None = None
    camera_id: str | None = None
    part_id: str | None = None
    model_name: str
    model_version: str
    width: int = Field(description="original image width in pixels")
    height: int
    verdict: Literal["OK", "NG"]
    detections: list[Detection]
    batch_size: int = Field(description="model inputs in the largest inference batch this image's inputs ran in")
    tiling: TilingInfo
    timings_ms: Timings


class SwapInfo(BaseModel):
    at: str = Field(description="ISO 8601 UTC")
    trigger: Literal["api", "rollback", "sighup", "watch"]
    bundle: str = Field(description="bundle folder, relative to swap.bundle_root")
    result: Literal["swapped", "refused"]
    from_version: str
    to_version: str | None
    reason: str | None
    duration_ms: float


class ModelInfo(BaseModel):
    name: str
    version: str
    architecture: str
    classes: list[str]
    input_width: int
    input_height: int
    backend: str = Field(description="backend really in use")
    backend_reason: str
    device: str
    precision: str
    batch_sizes: list[int] = Field(description="batch sizes the backend serves (all warmed up)")
    max_batch_size: int
    instances: int = Field(description="batches in flight at once (inference threads)")
    intra_op_threads: int | None = Field(
        default=None, description="ONNX Runtime intra-op threads per session (0: its default; null: not ONNX Runtime)"
    )
    max_delay_ms: float
    score_thresholds: dict[str, float] = Field(description="effective per-class thresholds (bundle + overrides)")
    nms_iou: float
    max_detections: int
    verdict_rule: VerdictRule
    tiling: dict[str, object] = Field(description="tiling in force: mode, tile size in frame pixels, overlap, limits")
    warmup_ms: dict[int, float]
    provenance: dict[str, object]
    files: dict[str, str]
    bundle_hash: str = Field(description="sha256 of bundle.json (which lists every file's sha256): what answers")
    loaded_at: str = Field(description="when this model started serving (ISO 8601 UTC)")
    swaps: list[SwapInfo] = Field(description="the last live swap attempts, oldest first (refused ones say why)")
