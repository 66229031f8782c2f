"""Reading the inspection records: filtered queries newest first with keyset pagination, one request's images, the
file of an archived image and why it is missing, and the integrity check. Synchronous, on a connection of its own:
the store runs it off the event loop (``asyncio.to_thread``), ``aoi records`` calls it directly.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.records.archive import MEDIA_TYPES
from service.records.record import InspectionRecord
from service.records.schema import MIGRATIONS

__all__ = [
    "CURRENT_REVIEW_OF_I",
    "ImageLookup",
    "QueryFilters",
    "RecordReader",
    "decode_cursor",
    "encode_cursor",
    "parse_time",
]

_MAX_SEQ = 2**63 - 1
# A live decision of record ``i``: a review row that is no undo and that no undo row points at (its newest such row is
# the image's current decision, docs/review.md); the reviews_inspection and reviews_undoes indexes answer it.
CURRENT_REVIEW_OF_I = """SELECT 1 FROM reviews r WHERE r.inspection_seq = i.seq AND r.decision != 'undo'
    AND NOT EXISTS (SELECT 1 FROM reviews u WHERE u.undoes = r.review_seq)"""
_SELECT = """
    SELECT i.*,
        f.path AS image_path, f.deleted_at AS image_deleted_at, f.deleted_reason AS image_deleted_reason,
        a.path AS annotated_path, a.deleted_at AS annotated_deleted_at, a.deleted_reason AS annotated_deleted_reason
    FROM inspections i
    LEFT JOIN archive_files f ON f.id = i.image_file_id
    LEFT JOIN archive_files a ON a.id = i.annotated_file_id
"""


def parse_time(value: str) -> float:
    """Epoch seconds (``1718000000.5``) or ISO 8601 (``2024-06-10T08:00:00Z``; no zone = UTC) -> epoch seconds.

    Raises:
        ValueError: neither form, or not finite.
    """
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise ValueError(f"{value!r} is neither ISO 8601 (2024-06-10T08:00:00Z) nor epoch seconds") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = moment.timestamp()
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is not a finite time")
    return seconds


def encode_cursor(seq: int) -> str:
    """The opaque cursor after row ``seq`` (clients must not build it: its form may change)."""
    return base64.urlsafe_b64encode(f"s{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """Raises: ValueError for anything :func:`encode_cursor` did not make."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        seq = int(text[1:]) if text.startswith("s") and text[1:].isdigit() else -1
    except (binascii.Error, UnicodeDecodeError, ValueError):
        seq = -1
    if not 0 < seq <= _MAX_SEQ:
        raise ValueError(f"cursor {cursor[:64]!r} is not one this API returned (take next_cursor as it is)")
    return seq


@dataclass(frozen=True)
class QueryFilters:
    """What :meth:`RecordReader.query` selects on; None = no filter. Times in epoch seconds, ``since`` inclusive,
    ``until`` exclusive."""

    camera_id: str | None = None
    part_id: str | None = None
    verdict: str | None = None
    class_name: str | None = None
    since: float | None = None
    until: float | None = None
    model_version: str | None = None
    reviewed: bool | None = None  # True: images with a current review decision; False: without (the review queue)

    def where(self) -> tuple[list[str], list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        equal = (
            ("camera_id", self.camera_id), ("part_id", self.part_id), ("verdict", self.verdict),
            ("model_version", self.model_version),
        )  # fmt: skip
        for column, value in equal:
            if value is not None:
                clauses.append(f"i.{column} = ?")
                params.append(value)
        if self.reviewed is not None:
            clauses.append(f"{'' if self.reviewed else 'NOT '}EXISTS ({CURRENT_REVIEW_OF_I})")
        if self.class_name is not None:
            clauses.append("i.seq IN (SELECT inspection_seq FROM detections WHERE class_name = ?)")
            params.append(self.class_name)
        if self.since is not None:
            clauses.append("i.received_at >= ?")
            params.append(self.since)
        if self.until is not None:
            clauses.append("i.received_at < ?")
            params.append(self.until)
        return clauses, params


@dataclass(frozen=True)
class ImageLookup:
    """The file of one archived image, or why there is none: ``reason`` is ``no_record``, ``not_archived`` (the
    archive rules did not keep it), ``deleted`` (by retention: ``deleted_reason`` age or quota, at ``deleted_at``)
    or ``missing`` (the row says kept, the file is gone: see ``aoi records check``)."""

    path: Path | None
    media_type: str
    reason: str | None = None
    deleted_at: float | None = None
    deleted_reason: str | None = None


def _file_status(row: sqlite3.Row, prefix: str) -> dict[str, Any]:
    path = row[f"{prefix}_path"]
    return {
        "kept": path is not None and row[f"{prefix}_deleted_at"] is None,
        "path": path,
        "deleted_at": row[f"{prefix}_deleted_at"],
        "deleted_reason": row[f"{prefix}_deleted_reason"],
    }


class RecordReader:
    """Queries over one records database (``data_dir/records.sqlite3``), given a connection opened by
    :func:`service.records.schema.open_reader` (or the writer's, in tests). Rows come out as JSON-ready dicts:
    the fields of :class:`service.records.record.InspectionRecord` plus ``seq``, ``image`` and ``annotated``
    (``{kept, path, deleted_at, deleted_reason}``, path relative to ``data_dir``)."""

    def __init__(self, conn: sqlite3.Connection, data_dir: Path) -> None:
        self.conn = conn
        self.data_dir = data_dir

    def _rows(self, sql: str, params: list[Any]) -> list[dict[str, Any]]:
        rows = self.conn.execute(sql, params).fetchall()
        detections = self._detections([int(r["seq"]) for r in rows])
        return [self._to_dict(r, detections.get(int(r["seq"]), [])) for r in rows]

    def _detections(self, seqs: list[int]) -> dict[int, list[dict[str, Any]]]:
        out: dict[int, list[dict[str, Any]]] = {}
        for start in range(0, len(seqs), 500):  # under SQLite's bound-parameter limit
            chunk = seqs[start : start + 500]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT * FROM detections WHERE inspection_seq IN ({marks}) ORDER BY inspection_seq, ordinal"
            for d in self.conn.execute(sql, chunk):
                out.setdefault(int(d["inspection_seq"]), []).append(
                    {
                        "class_id": d["class_id"],
                        "class_name": d["class_name"],
                        "score": d["score"],
                        "box_xyxy": [d["x1"], d["y1"], d["x2"], d["y2"]],
                    }
                )
        return out

    @staticmethod
    def _to_dict(row: sqlite3.Row, detections: list[dict[str, Any]]) -> dict[str, Any]:

        doc: dict[str, Any] = {"seq": row["seq"], **InspectionRecord.from_row(row, detections).to_dict()}
        doc["image"] = _file_status(row, "image")
        doc["annotated"] = _file_status(row, "annotated")
        return doc

    def query(
        self, filters: QueryFilters, limit: int = 100, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Up to ``limit`` records matching ``filters``, newest (highest seq) first, after ``cursor``; and the cursor
        of the next page (None on the last). Keyset pagination: rows added meanwhile never shift a page.

        Raises:
            ValueError: a cursor this API did not return.
        """
        rows, next_seq = self.page(filters, limit, decode_cursor(cursor) if cursor is not None else None)
        return rows, encode_cursor(next_seq) if next_seq is not None else None

    def page(
        self, filters: QueryFilters, limit: int = 100, before_seq: int | None = None
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Up to ``limit`` records matching ``filters`` with ``seq < before_seq``, newest first, and the
        ``before_seq`` of the next page (None on the last): :meth:`query` with the seq itself as the cursor."""
        clauses, params = filters.where()
        if before_seq is not None:
            clauses.append("i.seq < ?")
            params.append(before_seq)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._rows(f"{_SELECT} {where} ORDER BY i.seq DESC LIMIT ?", [*params, limit + 1])
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, int(rows[-1]["seq"]) if more and rows else None

    def count(self, filters: QueryFilters) -> int:
        """How many records match ``filters``."""
        clauses, params = filters.where()
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        return int(self.conn.execute(f"SELECT COUNT(*) FROM inspections i {where}", params).fetchone()[0])

    def get(self, request_id: str) -> list[dict[str, Any]]:
        """Every image recorded under ``request_id``, by image index (ids are chosen by clients: two requests with
        the same id both appear, oldest first within an index)."""
        return self._rows(f"{_SELECT} WHERE i.request_id = ? ORDER BY i.image_index, i.seq", [request_id])

    def image_file(self, request_id: str, index: int, annotated: bool = False) -> ImageLookup:
        """The archived file of image ``index`` of ``request_id`` (the newest such record), or why there is none."""
        column = "annotated_file_id" if annotated else "image_file_id"
        row = self.conn.execute(
            f"""SELECT f.path, f.deleted_at, f.deleted_reason, i.{column} AS file_id FROM inspections i
                LEFT JOIN archive_files f ON f.id = i.{column}
                WHERE i.request_id = ? AND i.image_index = ? ORDER BY i.seq DESC LIMIT 1""",
            [request_id, index],
        ).fetchone()
        if row is None:
            return ImageLookup(None, "", "no_record")
        if row["file_id"] is None:
            return ImageLookup(None, "", "not_archived")
        if row["deleted_at"] is not None:
            return ImageLookup(None, "", "deleted", row["deleted_at"], row["deleted_reason"])
        path = self.data_dir / row["path"]
        if not path.is_file():
            return ImageLookup(None, "", "missing")
        return ImageLookup(path, MEDIA_TYPES.get(path.suffix.lstrip("."), MEDIA_TYPES["bin"]))

    def integrity_check(self) -> list[str]:
        """Problems found, empty when none: SQLite's own ``PRAGMA integrity_check``, the schema version, and every
        archived file that a live row names: it must exist and its sha256 must match. Reads every kept file."""
        problems = [str(r[0]) for r in self.conn.execute("PRAGMA integrity_check") if r[0] != "ok"]
        version = int(self.conn.execute("PRAGMA user_version").fetchone()[0])
        if version != len(MIGRATIONS):
            problems.append(f"schema version {version}, expected {len(MIGRATIONS)}")
        for row in self.conn.execute("SELECT path, sha256 FROM archive_files WHERE deleted_at IS NULL ORDER BY id"):
            problem = _file_problem(self.data_dir / row["path"], row["sha256"])
            if problem:
                problems.append(f"{row['path']}: {problem}")
        return problems


def _file_problem(path: Path, sha256: str) -> str | None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        return "file missing (the record says it is kept)"
    except OSError as exc:
        return f"cannot read ({exc.strerror or exc})"
    if digest.hexdigest() != sha256:
        return f"sha256 {digest.hexdigest()[:16]}... differs from the recorded {sha256[:16]}..."
    return None
