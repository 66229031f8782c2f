"""Reading the station's SQLite journal for the forwarder: read-only, by seq range, rows already in central form."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.records.central.objects import object_key
from service.records.schema import DB_NAME

__all__ = [
    "DETECTION_COLUMNS",
    "IMAGE_COLUMNS",
    "INSPECTION_COLUMNS",
    "REVIEW_COLUMNS",
    "ArchivedFile",
    "Batch",
    "Journal",
    "JournalError",
]

INSPECTION_COLUMNS = (
    "station_id", "seq", "line_id", "request_id", "image_index", "received_at", "camera_id", "part_id", "filename",
    "model_name", "model_version", "model_hash", "backend", "precision", "verdict", "width", "height",
    "image_sha256", "image_bytes", "tiled", "tiles", "timings_ms",
)  # fmt: skip
DETECTION_COLUMNS = (
    "station_id", "seq", "ordinal", "received_at", "verdict", "class_id", "class_name", "score", "x1", "y1", "x2", "y2",
)  # fmt: skip
IMAGE_COLUMNS = ("station_id", "seq", "kind", "object_key", "sha256", "bytes")
REVIEW_COLUMNS = (
    "station_id", "review_seq", "inspection_seq", "request_id", "image_index", "decision", "boxes", "reviewer",
    "decided_at", "model_version", "model_hash", "undoes",
)  # fmt: skip

_SELECT_V1 = """SELECT seq, request_id, image_index, received_at, camera_id, part_id, filename, model_name,
    model_version, model_hash, backend, precision, verdict, width, height, image_sha256, image_bytes, tiled, tiles,
    timings_ms, NULL AS image_path, NULL AS image_file_bytes
    FROM inspections WHERE seq > ? ORDER BY seq LIMIT ?"""
# Only the uploaded image of a live archive row is referenced: a file retention deleted will never be uploaded, and
# the annotated copy is derived (it can be drawn again from the image and the detections).
_SELECT_V2 = """SELECT i.seq, i.request_id, i.image_index, i.received_at, i.camera_id, i.part_id, i.filename,
    i.model_name, i.model_version, i.model_hash, i.backend, i.precision, i.verdict, i.width, i.height,
    i.image_sha256, i.image_bytes, i.tiled, i.tiles, i.timings_ms, f.path AS image_path, f.bytes AS image_file_bytes
    FROM inspections i LEFT JOIN archive_files f ON f.id = i.image_file_id AND f.deleted_at IS NULL
    WHERE i.seq > ? ORDER BY i.seq LIMIT ?"""
_DETECTIONS = """SELECT d.inspection_seq, d.ordinal, i.received_at, i.verdict, d.class_id, d.class_name, d.score,
    d.x1, d.y1, d.x2, d.y2 FROM detections d JOIN inspections i ON i.seq = d.inspection_seq
    WHERE d.inspection_seq > ? AND d.inspection_seq <= ? ORDER BY d.inspection_seq, d.ordinal"""


_FILE_COLUMNS = "f.path, f.sha256, f.bytes, f.deleted_at, f.deleted_reason"
_RECORD_FILE = f"""SELECT {_FILE_COLUMNS} FROM inspections i JOIN archive_files f ON f.id = i.image_file_id
    WHERE i.seq = ?"""
# The same bytes are one archive file (named by their sha256): a record retention removed, or whose own file row was
# deleted and written again later, still finds its image by the sha256 central holds for it.
_LIVE_BY_SHA = f"""SELECT {_FILE_COLUMNS} FROM archive_files f
    WHERE f.sha256 = ? AND f.kind = 'image' AND f.deleted_at IS NULL ORDER BY f.id DESC LIMIT 1"""


class JournalError(Exception):
    """The journal cannot be read as a records database (corrupt, unknown schema)."""


@dataclass
class Batch:
    """Consecutive journal records ``(after, last_seq]`` as central rows (tuples in the ``*_COLUMNS`` order), and
    consecutive review decisions up to ``last_review_seq``."""

    inspections: list[tuple[Any, ...]] = field(default_factory=list)
    detections: list[tuple[Any, ...]] = field(default_factory=list)
    images: list[tuple[Any, ...]] = field(default_factory=list)
    last_seq: int = 0
    reviews: list[tuple[Any, ...]] = field(default_factory=list)  # review decisions of records central holds
    last_review_seq: int = 0


@dataclass(frozen=True)
class ArchivedFile:
    """An archive file of the station: ``path`` relative to its data_dir; ``deleted_at`` (epoch s) and
    ``deleted_reason`` (``age``, ``quota``) when retention deleted it."""

    path: str
    sha256: str
    bytes: int
    deleted_at: float | None
    deleted_reason: str | None


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


class Journal:
    """A read-only connection to ``data_dir/records.sqlite3``, opened when the file exists (the service creates it).

    Never writes: ``mode=ro`` plus ``query_only``. Each read is its own snapshot; a batch's detections are committed
    with their records (one SQLite transaction), so reading them in a second statement never misses one.
    """

    def __init__(self, data_dir: Path, station_id: str, line_id: str | None) -> None:
        self.path = data_dir / DB_NAME
        self.station_id = station_id
        self.line_id = line_id
        self._conn: sqlite3.Connection | None = None
        self._version = 0

    def _open(self) -> sqlite3.Connection | None:
        if self._conn is not None:
            return self._conn
        if not self.path.is_file():
            return None
        conn = sqlite3.connect(
            f"{self.path.as_uri()}?mode=ro", uri=True, isolation_level=None, timeout=5.0, check_same_thread=False
        )
        try:
            conn.execute("PRAGMA query_only=ON")
            self._version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise JournalError(f"{self.path}: not a records database ({exc})") from exc
        if self._version < 1:
            conn.close()
            return None  # created but not migrated yet: the service is starting
        self._conn = conn
        return conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def max_seq(self) -> int | None:
        """The newest seq in the journal, None when it is empty or not there yet."""
        conn = self._open()
        row = None if conn is None else conn.execute("SELECT max(seq) FROM inspections").fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def oldest_after(self, seq: int) -> float | None:
        """``received_at`` (epoch s) of the first record after ``seq``, None when there is none."""
        conn = self._open()
        if conn is None:
            return None
        row = conn.execute("SELECT received_at FROM inspections WHERE seq > ? ORDER BY seq LIMIT 1", [seq]).fetchone()
        return None if row is None else float(row[0])

    def identity(self, seq: int) -> tuple[str, float] | None:
        """``(request_id, received_at)`` of record ``seq``, None when the journal no longer has it."""
        conn = self._open()
        if conn is None:
            return None
        row = conn.execute("SELECT request_id, received_at FROM inspections WHERE seq = ?", [seq]).fetchone()
        return None if row is None else (str(row[0]), float(row[1]))

    def image_file(self, seq: int, sha256: str) -> ArchivedFile | None:
        """The archived file of record ``seq``'s image: its own archive row when that is live, else a live file of
        the same bytes (``sha256``), else its own row as deleted; None when the journal knows no such file (the
        record and every file of those bytes are gone, or a journal from before the archive)."""
        conn = self._open()
        if conn is None or self._version < 2:
            return None
        own = conn.execute(_RECORD_FILE, [seq]).fetchone()
        if own is not None and own[3] is None:
            return ArchivedFile(str(own[0]), str(own[1]), int(own[2]), None, None)
        live = conn.execute(_LIVE_BY_SHA, [sha256]).fetchone()
        row = live if live is not None else own
        if row is None:
            return None
        return ArchivedFile(str(row[0]), str(row[1]), int(row[2]), row[3], row[4])

    def read(self, after: int, limit: int) -> Batch:
        """Up to ``limit`` records with ``seq > after``, oldest first, with their detections and image references."""
        conn = self._open()
        batch = Batch(last_seq=after)
        if conn is None:
            return batch
        station, line = self.station_id, self.line_id
        for r in conn.execute(_SELECT_V2 if self._version >= 2 else _SELECT_V1, [after, limit]):
            seq, received = int(r[0]), _utc(float(r[3]))
            batch.inspections.append((station, seq, line, r[1], r[2], received, *r[4:17], bool(r[17]), r[18], r[19]))
            if r[20] is not None:
                ext = Path(str(r[20])).suffix.lstrip(".") or "bin"
                key = object_key(station, float(r[3]), str(r[1]), int(r[2]), ext, seq)
                batch.images.append((station, seq, "image", key, r[15], r[21]))
            batch.last_seq = seq
        if batch.inspections:
            for d in conn.execute(_DETECTIONS, [after, batch.last_seq]):
                batch.detections.append((station, int(d[0]), d[1], _utc(float(d[2])), *d[3:]))
        return batch

    def read_reviews(self, after: int, max_inspection_seq: int, limit: int) -> tuple[list[tuple[Any, ...]], int]:
        """Up to ``limit`` review decisions with ``review_seq > after``, oldest first, as central rows, stopping
        before the first one whose record is above ``max_inspection_seq`` (central must hold a decision's record
        first; the order is kept so central's max review_seq stays the watermark); and the last review_seq read."""
        conn = self._open()
        if conn is None or self._version < 4:  # a journal from before the reviews
            return [], after
        rows: list[tuple[Any, ...]] = []
        last = after
        sql = f"SELECT {', '.join(REVIEW_COLUMNS[1:])} FROM reviews WHERE review_seq > ? ORDER BY review_seq LIMIT ?"
        for r in conn.execute(sql, [after, limit]):
            if int(r[1]) > max_inspection_seq:
                break
            rows.append((self.station_id, *r[:7], _utc(float(r[7])), *r[8:]))
            last = int(r[0])
        return rows, last
