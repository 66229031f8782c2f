"""The record stage of the request path (docs/records.md): every answered image gets its inspection record (and,
NG or sampled, its archived image) and its verdict message for the line's signals, before the answer goes out.

Durable records: the 200 waits for the record's group commit, then for the signal's (so a PLC never hears of a
verdict that has no record). Fast records: both are handed over and the answer goes at once."""

from __future__ import annotations

import logging
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from service.core.errors import RecordsUnavailable
from service.core.results import InspectResult
from service.records.record import InspectionRecord
from service.records.schema import DB_NAME, RecordsSchemaError, open_writer
from service.records.store import RecordStore
from service.settings import RecordsSettings, Settings
from service.signals.hub import OutboxError, Signals

__all__ = ["RecordStage", "check_data_dir", "verdict_message"]


class _Backend(Protocol):
    @property
    def kind(self) -> str: ...

    @property
    def precision(self) -> str: ...


class ServedModel(Protocol):
    """What a record says of the model that computed it (a :class:`~service.inference.serving.ServingModel`)."""

    @property
    def backend(self) -> _Backend: ...

    @property
    def hash(self) -> str: ...

    @property
    def version(self) -> str: ...


logger = logging.getLogger(__name__)


def verdict_message(result: InspectResult, received_at: float) -> dict[str, Any]:
    """What the webhook and MQTT receive for one image (docs/signals.md)."""
    return {
        "request_id": result.request_id,
        "image_index": result.image_index,
        "time": datetime.fromtimestamp(received_at, UTC).isoformat(timespec="milliseconds"),
        "camera_id": result.camera_id,
        "part_id": result.part_id,
        "verdict": result.verdict,
        "model_name": result.model_name,
        "model_version": result.model_version,
        "detections": [
            {"class_name": d.class_name, "score": round(d.score, 5), "box_xyxy": [round(v, 2) for v in d.box_xyxy]}
            for d in result.detections
        ],
        "counts": dict(Counter(d.class_name for d in result.detections)),
    }


def inspection_record(
    result: InspectResult,
    model: ServedModel,
    received_at: float,
    image_sha256: str,
    image_bytes: int,
    station: tuple[str | None, str | None] = (None, None),
) -> InspectionRecord:
    """The record of one answered image, from its answer and the model that computed it; ``station``: the
    (station_id, line_id) that inspected it."""
    return InspectionRecord(
        station_id=station[0],
        line_id=station[1],
        request_id=result.request_id,
        image_index=result.image_index,
        received_at=received_at,
        camera_id=result.camera_id,
        part_id=result.part_id,
        filename=result.filename,
        model_name=result.model_name,
        model_version=result.model_version,
        model_hash=model.hash,
        backend=model.backend.kind,
        precision=model.backend.precision,
        verdict=result.verdict,
        detections=[d.model_dump(mode="json") for d in result.detections],
        timings_ms=result.timings_ms.model_dump(),
        width=result.width,
        height=result.height,
        image_sha256=image_sha256,
        image_bytes=image_bytes,
        tiled=result.tiling.tiled,
        tiles=result.tiling.tiles,
    )


def check_data_dir(settings: Settings) -> None:
    """Before the service starts: the data folder can be created and written, and its records database (if any) is
    one this version can use. Nothing to check when neither records nor signals are on.

    Raises:
        ValueError: naming the folder or file, the problem, and what to do.
    """
    if not settings.records.enabled and settings.signals.webhook.url is None and settings.signals.mqtt.host is None:
        return
    folder = settings.data_dir
    hint = "set data_dir (AOI_DATA_DIR) to a writable folder, or AOI_RECORDS__ENABLED=false to keep no records"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ValueError(f"data_dir {folder}: cannot write there ({exc.strerror}); {hint}") from exc
    if settings.records.enabled:
        try:
            open_writer(folder / DB_NAME, "NORMAL").close()  # creates or migrates it, as the store will
        except RecordsSchemaError as exc:
            raise ValueError(f"{exc}; move it away or point data_dir (AOI_DATA_DIR) elsewhere") from exc
        except (OSError, sqlite3.Error) as exc:
            raise ValueError(f"{folder / DB_NAME}: cannot open the records database ({exc}); {hint}") from exc


class RecordStage:
    """Records and signals of answered images. Either part may be absent (records disabled, no sink set)."""

    def __init__(
        self,
        settings: RecordsSettings,
        store: RecordStore | None,
        signals: Signals | None,
        station: tuple[str | None, str | None] = (None, None),
    ) -> None:
        """``station``: (station_id, line_id) written on every record."""
        self.station = station
        self.store = store
        self.signals = signals if signals is not None and signals.enabled else None
        self.durable = settings.durability == "durable"
        self.refuse = settings.on_failure == "refuse"

    @property
    def active(self) -> bool:
        """Whether answered images are recorded or signalled at all (else the image digests are not computed)."""
        return self.store is not None or self.signals is not None

    async def record(
        self,
        model: ServedModel,
        results: Sequence[InspectResult],
        images: Sequence[bytes],
        digests: Sequence[str],
        received_at: float,
    ) -> None:
        """Record and signal ``results`` (one per image of a request, with its uploaded bytes and sha256).

        Raises:
            RecordsUnavailable: ``records.on_failure: refuse`` and a record or its signal could not be written.
        """
        if self.store is not None:
            items = [
                (inspection_record(r, model, received_at, d, len(b), self.station), b)
                for r, b, d in zip(results, images, digests, strict=True)
            ]
            await self.store.add(items)
        if self.signals is not None:
            try:
                await self.signals.publish([verdict_message(r, received_at) for r in results], durable=self.durable)
            except OutboxError as exc:  # counted by the signals' metrics
                if self.refuse:
                    raise RecordsUnavailable(f"verdict signal not written to the outbox: {exc}") from exc
                logger.error("verdict signal of request %s not written: %s", results[0].request_id, exc)
