"""Records and real image bytes for the records tests (service/records/store.py, records_routes.py, records_cli.py)."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import cv2
import numpy as np

from service.records.record import InspectionRecord

__all__ = ["make_image", "make_record"]

SCRATCH = {"class_id": 0, "class_name": "scratches", "score": 0.91, "box_xyxy": [4.0, 6.0, 20.0, 22.0]}
PITTED = {"class_id": 3, "class_name": "pitted_surface", "score": 0.55, "box_xyxy": [30.0, 30.0, 40.0, 44.0]}


def make_image(seed: int, fmt: str = "jpg", size: int = 48, noise: bool = False) -> bytes:
    """A real JPEG/PNG whose bytes differ per ``seed`` (a bright patch at a seed-dependent place, or noise)."""
    rng = np.random.default_rng(seed)
    if noise:
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    else:
        img = np.full((size, size, 3), 40, np.uint8)
        x = seed % (size - 8)
        img[4:12, x : x + 8] = (255, 255 - seed % 200, seed % 256)
    ok, buf = cv2.imencode(f".{fmt}", img)
    assert ok
    return bytes(buf)


def make_record(
    request_id: str,
    image: bytes,
    *,
    index: int = 0,
    verdict: str = "NG",
    received_at: float | None = None,
    camera_id: str | None = "cam-1",
    part_id: str | None = None,
    detections: list[dict[str, Any]] | None = None,
) -> InspectionRecord:
    dets = detections if detections is not None else ([SCRATCH] if verdict == "NG" else [])
    return InspectionRecord(
        request_id=request_id,
        image_index=index,
        received_at=time.time() if received_at is None else received_at,
        camera_id=camera_id,
        part_id=part_id,
        filename=f"{request_id}.jpg",
        model_name="yolo11s.neu-det.fp32",
        model_version="1.4.0",
        model_hash="0123456789abcdef",
        backend="onnxruntime-cpu",
        precision="fp32",
        verdict=verdict,
        detections=list(dets),
        timings_ms={"decode": 1.5, "inference": 7.25, "total": 10.0},
        width=48,
        height=48,
        image_sha256=hashlib.sha256(image).hexdigest(),
        image_bytes=len(image),
        tiled=False,
        tiles=1,
    )
