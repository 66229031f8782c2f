"""Records and review decisions written the real way for the back-to-training tests (export-dataset and
calibrate-reviews): a :class:`RecordStore` records the images (and archives them), and
:func:`service.records.reviews.decide` records the decisions on a side writer, as the review API does."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from service.records.record import InspectionRecord
from service.records.reviews import decide
from service.records.schema import DB_NAME, open_side_writer
from service.records.store import RecordStore
from service.settings import ArchiveSettings, RecordsSettings
from tests.service.records_helpers import make_record

__all__ = ["CLASSES", "det", "png", "record", "review", "store_records"]

CLASSES = ["scratches", "inclusion", "patches", "pitted_surface"]


def png(seed: int, size: int = 48) -> bytes:
    """A PNG of ``size`` x ``size`` whose bytes differ per seed: textured grey with a bright square."""
    rng = np.random.default_rng(seed)
    img = rng.integers(60, 140, (size, size, 3), dtype=np.uint8)
    x, y = int(rng.integers(0, size - 16)), int(rng.integers(0, size - 16))
    img[y : y + 14, x : x + 14] = 230
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return bytes(buf)


def det(class_id: int, score: float, box: Sequence[float]) -> dict[str, Any]:
    return {"class_id": class_id, "class_name": CLASSES[class_id], "score": score, "box_xyxy": list(box)}


def record(request_id: str, image: bytes, **kw: Any) -> InspectionRecord:
    """:func:`make_record` of a 48 x 48 image; ``model_version`` / ``model_hash`` may be given too."""
    model = {k: kw.pop(k) for k in ("model_version", "model_hash") if k in kw}
    return dataclasses.replace(make_record(request_id, image, **kw), **model)


def store_records(data_dir: Path, items: Sequence[tuple[InspectionRecord, bytes]]) -> None:
    """Record (and archive: NG and every OK image) the images through a real RecordStore."""

    async def fill() -> None:
        settings = RecordsSettings(archive=ArchiveSettings(ok_sample_rate=1.0))
        store = RecordStore(settings, data_dir, sweep_interval_s=3600)
        store.start()
        try:
            await store.add(list(items))
        finally:
            await store.close(5.0)

    asyncio.run(fill())


def review(
    data_dir: Path,
    request_id: str,
    decision: str,
    boxes: Sequence[Mapping[str, Any]] = (),
    *,
    now: float | None = None,
    classes: Sequence[str] = CLASSES,
) -> None:
    """One decision on image 0 of ``request_id``, through the API function the review route calls."""
    conn = open_side_writer(data_dir / DB_NAME)
    try:
        decide(conn, request_id, 0, decision, boxes, "tester", classes, now)
    finally:
        conn.close()
