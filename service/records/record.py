"""The inspection record: what was inspected, by which model, and what came out, for one image of one request. The
data every part of the records package (writer, queries, the record stage) passes around."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["InspectionRecord"]


@dataclass(frozen=True)
class InspectionRecord:
    """What was inspected, by which model, and what came out: one image of one request.

    ``received_at`` is epoch seconds (UTC); ``detections`` are dicts ``{class_id, class_name, score, box_xyxy}``
    with the box in original-image pixels; ``model_hash`` is the sha256 (prefix) of the bundle's bundle.json;
    ``image_sha256`` must be the sha256 of the bytes passed to :meth:`RecordStore.add` (it names the archived file);
    ``image_bytes`` is the upload's size.
    """

    request_id: str
    image_index: int
    received_at: float
    camera_id: str | None
    part_id: str | None
    filename: str | None
    model_name: str
    model_version: str
    model_hash: str
    backend: str
    precision: str
    verdict: str  # "OK" | "NG"
    detections: list[dict[str, Any]]
    timings_ms: dict[str, float]
    width: int
    height: int
    image_sha256: str
    image_bytes: int
    tiled: bool
    tiles: int
    station_id: str | None = None  # the station that inspected it (None: recorded before identities existed)
    line_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (the detections and timings are copied, not shared)."""
        return asdict(self)

    @classmethod
    def from_row(cls, row: Mapping[str, Any] | sqlite3.Row, detections: list[dict[str, Any]]) -> InspectionRecord:
        """From an ``inspections`` row (a ``sqlite3.Row`` or a dict with its columns) and its detections."""
        return cls(
            request_id=row["request_id"],
            image_index=int(row["image_index"]),
            received_at=float(row["received_at"]),
            camera_id=row["camera_id"],
            part_id=row["part_id"],
            filename=row["filename"],
            model_name=row["model_name"],
            model_version=row["model_version"],
            model_hash=row["model_hash"],
            backend=row["backend"],
            precision=row["precision"],
            verdict=row["verdict"],
            detections=detections,
            timings_ms={k: float(v) for k, v in json.loads(row["timings_ms"]).items()},
            width=int(row["width"]),
            height=int(row["height"]),
            image_sha256=row["image_sha256"],
            image_bytes=int(row["image_bytes"]),
            tiled=bool(row["tiled"]),
            tiles=int(row["tiles"]),
            station_id=row["station_id"],
            line_id=row["line_id"],
        )
