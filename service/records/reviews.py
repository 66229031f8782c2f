"""Review decisions: what an operator at the review station decided about an inspected image (docs/review.md).

Every decision is a new row of the ``reviews`` table (schema step 4), never updated: the history is the table. An
image's current decision is its newest row that is not an ``undo`` and that no ``undo`` row points at; an undo is a
new row pointing at the current decision. Two reviewers deciding the same image at once are both recorded, in the
order SQLite commits them, and the later one is current (last write wins).

Decisions are written on a connection of their own (:func:`service.records.schema.open_side_writer`), one short
transaction each, beside the records writer thread's connection: WAL lets them share the file, the busy timeout
lets each wait for the other's commit. Reads (queue, history, current decision) use the store's query-only readers.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from service.core.errors import InvalidReview, NotFound, RecordsUnavailable
from service.records.metrics import ReviewMetrics
from service.records.query import QueryFilters, RecordReader
from service.records.schema import DB_NAME, open_reader, open_side_writer

__all__ = [
    "BOX_STATUSES",
    "DECISIONS",
    "Decision",
    "ReviewQueue",
    "ReviewStore",
    "ReviewedBox",
    "ReviewedImage",
    "archived_image",
    "current_decisions",
    "current_reviews",
    "decide",
    "fill_boxes",
    "history",
    "review_queue",
    "undo",
]

DECISIONS = ("confirmed", "false_call", "corrected", "skipped")
BOX_STATUSES = ("confirmed", "false_call", "relabelled", "added")
_T = TypeVar("_T")
_COLUMNS = """review_seq, inspection_seq, request_id, image_index, decision, boxes, reviewer, decided_at,
    model_version, model_hash, undoes"""
# The live decisions (not undo rows, not undone); the newest per image is its current one.
_LIVE = """SELECT r.* FROM reviews r WHERE r.decision != 'undo'
    AND NOT EXISTS (SELECT 1 FROM reviews u WHERE u.undoes = r.review_seq)"""


@dataclass(frozen=True)
class ReviewedBox:
    """One box as the reviewer judged it, in original image pixels. ``status``: ``confirmed`` (a true defect),
    ``false_call``, ``relabelled`` (a true defect of another class: ``original_class_id`` is the model's) or ``added``
    (a defect the model missed: no ``score``, no ``detection_ordinal``)."""

    box_xyxy: tuple[float, float, float, float]
    class_id: int
    class_name: str
    status: str
    score: float | None
    detection_ordinal: int | None
    original_class_id: int | None

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["box_xyxy"] = list(self.box_xyxy)
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ReviewedBox:
        x1, y1, x2, y2 = (float(v) for v in doc["box_xyxy"])
        return cls(
            box_xyxy=(x1, y1, x2, y2),
            class_id=int(doc["class_id"]),
            class_name=str(doc["class_name"]),
            status=str(doc["status"]),
            score=None if doc.get("score") is None else float(doc["score"]),
            detection_ordinal=None if doc.get("detection_ordinal") is None else int(doc["detection_ordinal"]),
            original_class_id=None if doc.get("original_class_id") is None else int(doc["original_class_id"]),
        )


@dataclass(frozen=True)
class Decision:
    """One row of the reviews table: a decision, or an ``undo`` (``undoes`` = the review_seq it takes back)."""

    review_seq: int
    inspection_seq: int
    request_id: str
    image_index: int
    decision: str
    boxes: tuple[ReviewedBox, ...]
    reviewer: str
    decided_at: float
    model_version: str
    model_hash: str
    undoes: int | None

    def to_dict(self) -> dict[str, Any]:
        """The API's form: ``{review_seq, decision, boxes, reviewer, decided_at, model_version, undoes}``."""
        return {
            "review_seq": self.review_seq,
            "decision": self.decision,
            "boxes": [b.to_dict() for b in self.boxes],
            "reviewer": self.reviewer,
            "decided_at": self.decided_at,
            "model_version": self.model_version,
            "undoes": self.undoes,
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any] | sqlite3.Row) -> Decision:
        return cls(
            review_seq=int(row["review_seq"]),
            inspection_seq=int(row["inspection_seq"]),
            request_id=str(row["request_id"]),
            image_index=int(row["image_index"]),
            decision=str(row["decision"]),
            boxes=tuple(ReviewedBox.from_dict(b) for b in json.loads(row["boxes"])),
            reviewer=str(row["reviewer"]),
            decided_at=float(row["decided_at"]),
            model_version=str(row["model_version"]),
            model_hash=str(row["model_hash"]),
            undoes=None if row["undoes"] is None else int(row["undoes"]),
        )


@dataclass(frozen=True)
class ReviewedImage:
    """An image's current decision with what the training side needs of its record (:func:`current_reviews`)."""

    inspection_seq: int
    request_id: str
    image_index: int
    camera_id: str | None
    part_id: str | None
    received_at: float
    model_name: str
    model_version: str
    model_hash: str
    verdict: str  # the model's
    decision: str
    boxes: tuple[ReviewedBox, ...]
    reviewer: str
    decided_at: float
    image_sha256: str
    width: int
    height: int


# --- the boxes of a decision -----------------------------------------------------------------------------------------


def _class_of(classes: Sequence[str], class_id: Any, where: str) -> tuple[int, str]:
    """(class_id, class_name) of a class of the served bundle.

    Raises:
        InvalidReview: not an int among the bundle's class ids.
    """
    if isinstance(class_id, bool) or not isinstance(class_id, int) or not 0 <= class_id < len(classes):
        raise InvalidReview(
            f"{where}: class_id {class_id!r} is not a class of the served bundle (0..{len(classes) - 1})"
        )
    return class_id, classes[class_id]


def _box(value: Any, size: tuple[int, int], where: str) -> tuple[float, float, float, float]:
    """A reviewer's box: four finite numbers, x1 < x2, y1 < y2, inside the ``size`` (width, height) image."""
    if not isinstance(value, Sequence) or len(value) != 4:
        raise InvalidReview(f"{where}: box_xyxy must be [x1, y1, x2, y2] in original image pixels")
    try:
        x1, y1, x2, y2 = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InvalidReview(f"{where}: box_xyxy must hold four numbers") from None
    width, height = size
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise InvalidReview(
            f"{where}: box_xyxy {[x1, y1, x2, y2]} is not a box inside the {width}x{height} image (0 <= x1 < x2 <= "
            "width, 0 <= y1 < y2 <= height)"
        )
    return x1, y1, x2, y2


def _model_box(det: Mapping[str, Any], ordinal: int, status: str) -> ReviewedBox:
    x1, y1, x2, y2 = (float(v) for v in det["box_xyxy"])
    return ReviewedBox(
        (x1, y1, x2, y2), int(det["class_id"]), str(det["class_name"]), status, float(det["score"]), ordinal, None
    )


def _corrected_box(
    given: Mapping[str, Any], dets: Sequence[Mapping[str, Any]], classes: Sequence[str], size: tuple[int, int], i: int
) -> ReviewedBox:
    """One box of a ``corrected`` decision: a model detection by ordinal (confirmed, false_call, relabelled) or an
    added one; what the record holds (box, score, the model's class) is filled from the record."""
    where = f"boxes[{i}]"
    status, ordinal = given.get("status"), given.get("detection_ordinal")
    if status not in BOX_STATUSES:
        raise InvalidReview(f"{where}: status {status!r} is not one of {', '.join(BOX_STATUSES)}")
    if ordinal is None:
        if status != "added":
            raise InvalidReview(f"{where}: a box without detection_ordinal is one the reviewer added (status added)")
        class_id, name = _class_of(classes, given.get("class_id"), where)
        return ReviewedBox(_box(given.get("box_xyxy"), size, where), class_id, name, "added", None, None, None)
    if isinstance(ordinal, bool) or not isinstance(ordinal, int) or not 0 <= ordinal < len(dets):
        raise InvalidReview(f"{where}: detection_ordinal {ordinal!r} is not one of the record's {len(dets)} detections")
    det = dets[ordinal]
    model_class = int(det["class_id"])
    if status == "added":
        raise InvalidReview(f"{where}: an added box has no detection_ordinal (detection {ordinal} is the model's)")
    if status != "relabelled":
        if given.get("class_id") is not None and given.get("class_id") != model_class:
            raise InvalidReview(f"{where}: class_id differs from detection {ordinal}'s ({model_class}): use relabelled")
        return _model_box(det, ordinal, status)
    class_id, name = _class_of(classes, given.get("class_id"), where)
    if class_id == model_class:
        raise InvalidReview(f"{where}: relabelled to the model's own class {model_class}: that is confirmed")
    box = _model_box(det, ordinal, status).box_xyxy
    if given.get("box_xyxy") is not None:  # the reviewer may redraw a relabelled box
        box = _box(given["box_xyxy"], size, where)
    return ReviewedBox(box, class_id, name, "relabelled", float(det["score"]), ordinal, model_class)


def fill_boxes(
    decision: str,
    given: Sequence[Mapping[str, Any]],
    detections: Sequence[Mapping[str, Any]],
    classes: Sequence[str],
    size: tuple[int, int],
) -> tuple[ReviewedBox, ...]:
    """The boxes of a decision on a record with ``detections`` (its ``{class_id, class_name, score, box_xyxy}`` in
    ordinal order), an image of ``size`` (width, height), judged against the served bundle's ``classes``:
    ``confirmed`` / ``false_call`` take every model box with that status (``given`` must be empty), ``skipped`` has
    none, ``corrected`` lists every model detection once by ordinal plus any added boxes.

    Raises:
        InvalidReview: the decision is unknown or does not fit the record (the message says where).
    """
    if decision not in DECISIONS:
        raise InvalidReview(f"decision {decision!r} is not one of {', '.join(DECISIONS)}")
    if decision != "corrected":
        if given:
            raise InvalidReview(f"a {decision} decision takes no boxes (the server fills them from the record)")
        if decision == "false_call" and not detections:
            raise InvalidReview("false_call: the record has no detection to call false (confirm it, or add a box)")
        status = "confirmed" if decision == "confirmed" else "false_call"
        return () if decision == "skipped" else tuple(_model_box(d, i, status) for i, d in enumerate(detections))
    boxes = [_corrected_box(b, detections, classes, size, i) for i, b in enumerate(given)]
    ordinals = [b.detection_ordinal for b in boxes if b.detection_ordinal is not None]
    twice = sorted({o for o in ordinals if ordinals.count(o) > 1})
    missing = sorted(set(range(len(detections))) - set(ordinals))
    if twice or missing:
        raise InvalidReview(
            f"corrected: list every model detection once by detection_ordinal (listed twice: {twice}; missing: "
            f"{missing}), each confirmed, false_call or relabelled"
        )
    return tuple(sorted(boxes, key=lambda b: (b.detection_ordinal is None, b.detection_ordinal or 0)))


# --- reading ---------------------------------------------------------------------------------------------------------


def _record(conn: sqlite3.Connection, request_id: str, index: int) -> dict[str, Any]:
    """The newest record of image ``index`` of ``request_id`` (ids are chosen by clients and may repeat).

    Raises:
        NotFound: no such record.
    """
    found = [d for d in RecordReader(conn, Path()).get(request_id) if d["image_index"] == index]
    if not found:
        raise NotFound(f"no image {index} recorded under request id {request_id!r}")
    return max(found, key=lambda d: int(d["seq"]))


def current_decisions(conn: sqlite3.Connection, seqs: Sequence[int]) -> dict[int, Decision]:
    """The current decision of each record of ``seqs`` that has one."""
    out: dict[int, Decision] = {}
    for start in range(0, len(seqs), 500):  # under SQLite's bound-parameter limit
        chunk = list(seqs[start : start + 500])
        marks = ",".join("?" * len(chunk))
        sql = f"{_LIVE} AND r.inspection_seq IN ({marks}) ORDER BY r.inspection_seq, r.review_seq DESC"
        for row in conn.execute(sql, chunk):
            out.setdefault(int(row["inspection_seq"]), Decision.from_row(row))
    return out


def history(conn: sqlite3.Connection, request_id: str, index: int) -> list[Decision]:
    """Every decision and undo of the image's newest record, newest first.

    Raises:
        NotFound: no such record.
    """
    seq = int(_record(conn, request_id, index)["seq"])
    rows = conn.execute(f"SELECT {_COLUMNS} FROM reviews WHERE inspection_seq = ? ORDER BY review_seq DESC", [seq])
    return [Decision.from_row(r) for r in rows]


def current_reviews(conn: sqlite3.Connection) -> Iterator[ReviewedImage]:
    """Every reviewed image's current decision (``skipped`` included: leave those out of rates and datasets), with
    its record, oldest record first."""
    sql = f"""WITH live AS ({_LIVE}),
        cur AS (SELECT inspection_seq, MAX(review_seq) AS review_seq FROM live GROUP BY inspection_seq)
        SELECT r.*, i.camera_id, i.part_id, i.received_at, i.model_name, i.verdict, i.image_sha256, i.width, i.height
        FROM cur JOIN reviews r ON r.review_seq = cur.review_seq JOIN inspections i ON i.seq = r.inspection_seq
        ORDER BY r.inspection_seq"""
    for row in conn.execute(sql):
        d = Decision.from_row(row)
        yield ReviewedImage(
            inspection_seq=d.inspection_seq, request_id=d.request_id, image_index=d.image_index,
            camera_id=row["camera_id"], part_id=row["part_id"], received_at=float(row["received_at"]),
            model_name=row["model_name"], model_version=d.model_version, model_hash=d.model_hash,
            verdict=row["verdict"], decision=d.decision, boxes=d.boxes, reviewer=d.reviewer,
            decided_at=d.decided_at, image_sha256=row["image_sha256"], width=int(row["width"]),
            height=int(row["height"]),
        )  # fmt: skip


def archived_image(data_dir: Path, request_id: str, image_index: int) -> Path | None:
    """The archived file of an image's newest record (as ``GET /v1/inspections/{id}/images/{i}`` serves it), None
    when it was not archived, was deleted by retention, or is missing. Opens its own reader on ``data_dir``."""
    conn = open_reader(data_dir / DB_NAME)
    try:
        return RecordReader(conn, data_dir).image_file(request_id, image_index).path
    finally:
        conn.close()


@dataclass(frozen=True)
class ReviewQueue:
    """One page of the review queue, newest first: the records (:class:`RecordReader` dicts), each record's current
    decision (by seq), the ``before_seq`` of the next page and how many images match and have no decision."""

    items: list[dict[str, Any]]
    current: dict[int, Decision]
    next_before_seq: int | None
    total_unreviewed: int


def review_queue(reader: RecordReader, filters: QueryFilters, limit: int, before_seq: int | None) -> ReviewQueue:
    """The records a reviewer works through: ``filters`` (its ``reviewed`` says which: False for the unreviewed),
    newest first, keyset-paginated on seq (a decision or a new record never shifts a page)."""
    items, next_seq = reader.page(filters, limit, before_seq)
    current = current_decisions(reader.conn, [int(d["seq"]) for d in items])
    unreviewed = reader.count(replace(filters, reviewed=False))
    return ReviewQueue(items, current, next_seq, unreviewed)


# --- writing ---------------------------------------------------------------------------------------------------------


def _insert(conn: sqlite3.Connection, record: Mapping[str, Any], decision: str, boxes: Sequence[ReviewedBox],
            reviewer: str, now: float, undoes: int | None) -> Decision:  # fmt: skip
    doc = json.dumps([b.to_dict() for b in boxes], separators=(",", ":"))
    values = [int(record["seq"]), record["request_id"], int(record["image_index"]), decision, doc, reviewer, now,
              record["model_version"], record["model_hash"], undoes]  # fmt: skip
    row = conn.execute(
        f"""INSERT INTO reviews (inspection_seq, request_id, image_index, decision, boxes, reviewer, decided_at,
               model_version, model_hash, undoes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING {_COLUMNS}""",
        values,
    ).fetchone()
    return Decision.from_row(row)


def _in_transaction(conn: sqlite3.Connection, work: Callable[[], _T]) -> _T:
    """``work`` in one IMMEDIATE transaction (the write lock taken at BEGIN: waits up to the busy timeout)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def decide(
    conn: sqlite3.Connection,
    request_id: str,
    index: int,
    decision: str,
    boxes: Sequence[Mapping[str, Any]],
    reviewer: str,
    classes: Sequence[str],
    now: float | None = None,
) -> tuple[Decision, dict[str, Any]]:
    """Record a decision on image ``index`` of ``request_id`` (its newest record), the boxes filled and checked by
    :func:`fill_boxes`; return it and the record it judged.

    Raises:
        NotFound: no such record.
        InvalidReview: the decision does not fit the record.
    """
    record = _record(conn, request_id, index)
    filled = fill_boxes(decision, boxes, record["detections"], classes, (int(record["width"]), int(record["height"])))
    when = time.time() if now is None else now
    return _in_transaction(conn, lambda: _insert(conn, record, decision, filled, reviewer, when, None)), record


def undo(
    conn: sqlite3.Connection, request_id: str, index: int, reviewer: str, now: float | None = None
) -> tuple[Decision, Decision | None, dict[str, Any]]:
    """Take back the image's current decision: a new ``undo`` row pointing at it. Return the undo row, the decision
    current after it (None: none) and the record.

    Raises:
        NotFound: no such record, or it has no current decision.
    """
    record = _record(conn, request_id, index)
    seq = int(record["seq"])
    when = time.time() if now is None else now

    def work() -> tuple[Decision, Decision | None]:
        current = current_decisions(conn, [seq]).get(seq)
        if current is None:
            raise NotFound(f"image {index} of request {request_id!r} has no review decision to undo")
        row = _insert(conn, record, "undo", (), reviewer, when, current.review_seq)
        return row, current_decisions(conn, [seq]).get(seq)

    row, now_current = _in_transaction(conn, work)
    return row, now_current, record


# --- the store's side ------------------------------------------------------------------------------------------------


class ReviewStore:
    """The review decisions of one records database, for the service: writes on one side connection (a lock keeps
    them one at a time in this process), reads on a query-only connection per worker thread, all off the event loop;
    counts every decision in :class:`~service.records.metrics.ReviewMetrics`."""

    def __init__(self, db_path: Path, data_dir: Path, metrics: ReviewMetrics) -> None:
        self.db_path = db_path
        self.data_dir = data_dir
        self.metrics = metrics
        self._lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        self._readers = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._closed = False

    def close(self) -> None:
        """Close every connection (at the store's close)."""
        with self._lock:
            self._closed = True
            for conn in self._conns:
                conn.close()
            self._conns.clear()
            self._writer = None

    def _write(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        with self._lock:
            if self._closed:
                raise RecordsUnavailable("the records store is closed: the service is stopping")
            if self._writer is None:
                self._writer = open_side_writer(self.db_path)
                self._conns.append(self._writer)
            return fn(self._writer)

    def _reader(self) -> RecordReader:
        reader: RecordReader | None = getattr(self._readers, "reader", None)
        if reader is None:
            conn = open_reader(self.db_path)
            with self._lock:
                self._conns.append(conn)
            reader = RecordReader(conn, self.data_dir)
            self._readers.reader = reader
        return reader

    async def _read(self, fn: Callable[[RecordReader], _T]) -> _T:
        return await asyncio.to_thread(lambda: fn(self._reader()))

    async def decide(
        self, request_id: str, index: int, decision: str, boxes: Sequence[Mapping[str, Any]], reviewer: str,
        classes: Sequence[str],
    ) -> Decision:  # fmt: skip
        """:func:`decide`, counted. Raises: NotFound, InvalidReview."""
        row, record = await asyncio.to_thread(
            self._write, lambda c: decide(c, request_id, index, decision, boxes, reviewer, classes)
        )
        self._count(row, record.get("camera_id"))
        return row

    async def undo(self, request_id: str, index: int, reviewer: str) -> Decision | None:
        """:func:`undo`, counted; the decision now current. Raises: NotFound."""
        row, current, record = await asyncio.to_thread(self._write, lambda c: undo(c, request_id, index, reviewer))
        self._count(row, record.get("camera_id"))
        return current

    async def history(self, request_id: str, index: int) -> list[Decision]:
        """:func:`history`. Raises: NotFound."""
        return await self._read(lambda r: history(r.conn, request_id, index))

    async def queue(self, filters: QueryFilters, limit: int, before_seq: int | None) -> ReviewQueue:
        """:func:`review_queue`."""
        return await self._read(lambda r: review_queue(r, filters, limit, before_seq))

    def _count(self, row: Decision, camera_id: str | None) -> None:
        camera = camera_id or ""
        self.metrics.decisions.labels(decision=row.decision, camera_id=camera).inc()
        for box in row.boxes:
            self.metrics.boxes.labels(status=box.status, class_name=box.class_name, camera_id=camera).inc()
            if box.status == "added":
                self.metrics.escapes.labels(class_name=box.class_name, camera_id=camera).inc()
