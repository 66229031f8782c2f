"""The writer thread's side of the record store: one group commit (archive files written and fsynced first, then one
SQLite transaction), and the retention sweep. Only the writer thread calls :class:`GroupWriter`, so nothing here
locks: SQLite sees a single writer and the running archive total has a single owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import random
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.records.archive import (
    annotated_rel_path,
    draw_annotated,
    fsync_dirs,
    image_extension,
    image_rel_path,
    keep_image,
    write_file,
)
from service.settings import RecordsSettings

if TYPE_CHECKING:
    from service.records.metrics import RecordsMetrics
    from service.records.record import InspectionRecord

__all__ = ["GroupWriter", "PendingItem", "RecordWriteError", "Waiter", "failure_reason", "resolve_all"]

logger = logging.getLogger(__name__)
_CHUNK = 500  # files or records per retention transaction: a sweep never holds the writer for long


class RecordWriteError(Exception):
    """A group could not be written; ``reason`` is the ``aoi_records_lost_total`` label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Waiter:
    """The asyncio future a durable ``add`` awaits, resolved from the writer thread through its loop
    (:func:`resolve_all`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()

    def _set(self, error: Exception | None) -> None:
        """On the waiter's loop."""
        if self.future.done():
            return
        if error is None:
            self.future.set_result(None)
        else:
            self.future.set_exception(error)
            self.future.exception()  # retrieved: a request that stopped waiting must not log "never retrieved"


def resolve_all(waiters: list[Waiter], error: Exception | None) -> None:
    """Answer the waiters of a group from the writer thread: one hand-off per event loop for the whole group (each
    ``call_soon_threadsafe`` wakes the loop: a group of 8 requests was 8 wake-ups)."""
    by_loop: dict[asyncio.AbstractEventLoop, dict[int, Waiter]] = {}
    for w in waiters:
        by_loop.setdefault(w.loop, {})[id(w)] = w  # a request's records share one waiter

    def _set_all(mine: list[Waiter]) -> None:
        for w in mine:
            w._set(error)

    for loop, mine in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(_set_all, list(mine.values()))


@dataclass(eq=False)
class PendingItem:
    """One record on its way to disk: queued (its ``add`` may still give up on it and take it back), then taken into
    a group by the writer thread."""

    record: InspectionRecord
    image: bytes | None
    waiter: Waiter | None


def failure_reason(exc: BaseException) -> str:
    """The loss reason of a write error: disk_full (SQLITE_FULL, ENOSPC, EDQUOT), read_only, io_error, db_error."""
    if isinstance(exc, sqlite3.Error):
        name = str(getattr(exc, "sqlite_errorname", ""))
        if name == "SQLITE_FULL" or "disk is full" in str(exc):
            return "disk_full"
        if name.startswith("SQLITE_READONLY") or "readonly" in str(exc):
            return "read_only"
        return "io_error" if name.startswith("SQLITE_IOERR") else "db_error"
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return "disk_full"
        return "read_only" if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else "io_error"
    return "internal_error"


@dataclass
class _File:
    """An archive file a record of the group refers to: a live one (``file_id`` set) or one to write."""

    rel: str
    kind: str
    sha256: str
    data: bytes | None
    seen_at: float
    file_id: int | None = None


class GroupWriter:
    """Group commits and retention on the one write connection ``conn`` (opened by ``open_writer``)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        data_dir: Path,
        settings: RecordsSettings,
        metrics: RecordsMetrics,
        rng: random.Random,
        prunable_seq: Callable[[], int | None] | None = None,
    ) -> None:
        """``prunable_seq``: the highest record seq retention may delete (the central store's acknowledged
        watermark when records are forwarded: a record is pruned only once the plant has it); None: any."""
        self.conn = conn
        self.prunable_seq = prunable_seq
        self.data_dir = data_dir
        self.settings = settings
        self.metrics = metrics
        self.rng = rng
        self.durable = settings.durability == "durable"  # fast: files left to the page cache, as the records are
        row = conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM archive_files WHERE deleted_at IS NULL").fetchone()
        self.archive_bytes = int(row[0])  # the running total: the archive's size without walking its tree
        self.metrics.archive_bytes.set(self.archive_bytes)
        self._orphans_checked = False

    def close(self) -> None:
        try:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            logger.warning("records: checkpoint at close failed (%s); the WAL is replayed at the next open", exc)
        self.conn.close()

    # --- group commit ----------------------------------------------------------------------------------------

    def commit(self, group: list[PendingItem]) -> None:
        """Archive files (written, fsynced, folders fsynced), then every record in one transaction.

        Raises:
            RecordWriteError: nothing of the group is recorded (files it wrote are removed again).
        """
        files: dict[str, _File] = {}
        links: list[tuple[str | None, str | None]] = []
        written: list[_File] = []
        try:
            for item in group:
                links.append(self._plan(item, files))
            dirty: set[Path] = set()
            for f in files.values():
                if f.file_id is None and f.data is not None:
                    write_file(self.data_dir, f.rel, f.data, dirty, sync=self.durable)
                    written.append(f)
            if self.durable:
                fsync_dirs(dirty)
            self._transaction(group, files, links)
        except (sqlite3.Error, OSError) as exc:
            self._undo(written)
            reason = failure_reason(exc)
            raise RecordWriteError(reason, f"{reason.replace('_', ' ')}: {exc} ({self.data_dir})") from exc
        added = sum(len(f.data or b"") for f in written)
        self.archive_bytes += added
        self.metrics.archive_images.inc(len(written))
        self.metrics.archive_bytes.set(self.archive_bytes)

    def _plan(self, item: PendingItem, files: dict[str, _File]) -> tuple[str | None, str | None]:
        """Decide what of ``item`` is archived; return the keys (in ``files``) of its image and annotated copy."""
        rec = item.record
        if item.image is None or not keep_image(rec.verdict, self.settings.archive, self.rng):
            return None, None
        key = f"image:{rec.image_sha256}"
        if key in files:
            files[key].seen_at = max(files[key].seen_at, rec.received_at)
        else:
            live = self.conn.execute(
                "SELECT id, path FROM archive_files WHERE sha256 = ? AND kind = 'image' AND deleted_at IS NULL",
                [rec.image_sha256],
            ).fetchone()
            if live is not None:
                files[key] = _File(live["path"], "image", rec.image_sha256, None, rec.received_at, live["id"])
            else:
                rel = image_rel_path(rec.image_sha256, image_extension(item.image), rec.received_at)
                files[key] = _File(rel, "image", rec.image_sha256, item.image, rec.received_at)
        if not self.settings.archive.annotated:
            return key, None
        jpeg = draw_annotated(item.image, rec.detections)
        if jpeg is None:
            return key, None
        import hashlib

        rel = self._free_annotated_path(rec, files)
        files[rel] = _File(rel, "annotated", hashlib.sha256(jpeg).hexdigest(), jpeg, rec.received_at)
        return key, rel

    def _free_annotated_path(self, rec: InspectionRecord, files: dict[str, _File]) -> str:
        """``<request_id>_<index>.jpg``, or with ``-1``, ``-2``... when a client reused a request id."""
        for attempt in range(1000):
            rel = annotated_rel_path(rec.request_id, rec.image_index, rec.received_at, attempt)
            taken = self.conn.execute("SELECT 1 FROM archive_files WHERE path = ?", [rel]).fetchone()
            if rel not in files and taken is None:
                return rel
        raise RecordWriteError("internal_error", f"no free annotated file name for request id {rec.request_id!r}")

    def _transaction(
        self, group: list[PendingItem], files: dict[str, _File], links: list[tuple[str | None, str | None]]
    ) -> None:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for f in files.values():
                self._store_file(f)
            for item, (image_key, annotated_key) in zip(group, links, strict=True):
                image_id = files[image_key].file_id if image_key else None
                annotated_id = files[annotated_key].file_id if annotated_key else None
                self._insert(item.record, image_id, annotated_id)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _store_file(self, f: _File) -> None:
        if f.file_id is not None:
            self.conn.execute(
                "UPDATE archive_files SET last_seen_at = MAX(last_seen_at, ?) WHERE id = ?", [f.seen_at, f.file_id]
            )
            return
        # A path retention deleted earlier comes back (the same bytes again, the same day): its row lives again.
        row = self.conn.execute(
            """INSERT INTO archive_files (path, kind, sha256, bytes, created_at, last_seen_at)
               VALUES (?, ?, ?, ?, ?, ?)
               ON CONFLICT (path) DO UPDATE SET sha256 = excluded.sha256, bytes = excluded.bytes,
                   created_at = excluded.created_at, last_seen_at = excluded.last_seen_at,
                   deleted_at = NULL, deleted_reason = NULL
               RETURNING id""",
            [f.rel, f.kind, f.sha256, len(f.data or b""), time.time(), f.seen_at],
        ).fetchone()
        f.file_id = int(row[0])

    def _insert(self, rec: InspectionRecord, image_id: int | None, annotated_id: int | None) -> None:
        cur = self.conn.execute(
            """INSERT INTO inspections (request_id, image_index, received_at, camera_id, part_id, filename,
                   model_name, model_version, model_hash, backend, precision, verdict, width, height, image_sha256,
                   image_bytes, tiled, tiles, timings_ms, image_file_id, annotated_file_id, station_id, line_id)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            [
                rec.request_id, rec.image_index, rec.received_at, rec.camera_id, rec.part_id, rec.filename,
                rec.model_name, rec.model_version, rec.model_hash, rec.backend, rec.precision, rec.verdict,
                rec.width, rec.height, rec.image_sha256, rec.image_bytes, int(rec.tiled), rec.tiles,
                json.dumps(rec.timings_ms), image_id, annotated_id, rec.station_id, rec.line_id,
            ],
        )  # fmt: skip
        seq = cur.lastrowid
        self.conn.executemany(
            """INSERT INTO detections (inspection_seq, ordinal, class_id, class_name, score, x1, y1, x2, y2)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            [
                (seq, i, int(d["class_id"]), str(d["class_name"]), float(d["score"]), *map(float, d["box_xyxy"]))
                for i, d in enumerate(rec.detections)
            ],
        )

    def _undo(self, written: list[_File]) -> None:
        """Remove the files of a group that was not committed (no record refers to them)."""
        for f in written:
            try:
                (self.data_dir / f.rel).unlink(missing_ok=True)
            except OSError as exc:
                logger.warning("records: cannot remove %s of a failed group (%s)", f.rel, exc)

    # --- retention -------------------------------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        """Retention: files a crash left unrecorded (first sweep only), files not seen for
        ``archive.retention_days``, then the oldest files while the archive is over ``archive.max_bytes``, then
        records older than ``retention_days``. Deleted files keep their row, marked with when and why."""
        if not self._orphans_checked:
            self._remove_orphans()
            self._orphans_checked = True
        cutoff = now - self.settings.archive.retention_days * 86400
        while self._delete_files(
            "SELECT id, path, bytes FROM archive_files WHERE deleted_at IS NULL AND last_seen_at < ? "
            f"ORDER BY last_seen_at, id LIMIT {_CHUNK}",
            [cutoff],
            "age",
            now,
        ):
            pass
        while self.archive_bytes > self.settings.archive.max_bytes:
            if not self._delete_files(
                "SELECT id, path, bytes FROM archive_files WHERE deleted_at IS NULL "
                f"ORDER BY last_seen_at, id LIMIT {_CHUNK}",
                [],
                "quota",
                now,
                stop_at=self.settings.archive.max_bytes,
            ):
                break
        if self.settings.retention_days is not None:
            self._delete_records(now - self.settings.retention_days * 86400)

    def _delete_files(self, sql: str, params: list[Any], reason: str, now: float, stop_at: int | None = None) -> int:
        """Mark the files ``sql`` selects deleted (committed first: a crash before the unlink leaves an orphan the
        next start removes, never a record pointing at a file that is gone), then unlink them; return how many.
        With ``stop_at``, only as many as bring the archive down to that many bytes."""
        rows = self.conn.execute(sql, params).fetchall()
        if stop_at is not None:
            chosen, total = [], self.archive_bytes
            for r in rows:
                if total <= stop_at:
                    break
                chosen.append(r)
                total -= int(r["bytes"])
            rows = chosen
        if not rows:
            return 0
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.executemany(
            "UPDATE archive_files SET deleted_at = ?, deleted_reason = ? WHERE id = ?",
            [(now, reason, r["id"]) for r in rows],
        )
        self.conn.execute("COMMIT")
        for r in rows:
            self._unlink(r["path"])
            self.archive_bytes -= int(r["bytes"])
        self.metrics.archive_deleted.labels(reason=reason).inc(len(rows))
        self.metrics.archive_bytes.set(self.archive_bytes)
        logger.info("records: deleted %d archived file(s) (%s)", len(rows), reason)
        return len(rows)

    def _unlink(self, rel: str) -> None:
        path = self.data_dir / rel
        try:
            path.unlink(missing_ok=True)
            if not any(path.parent.iterdir()):
                path.parent.rmdir()  # an emptied day folder
        except OSError as exc:
            logger.warning("records: cannot delete %s (%s)", path, exc)

    def _delete_records(self, cutoff: float) -> None:
        """Records older than ``cutoff``, in chunks; never the newest record (SQLite gives a new row max(seq) + 1, so a
        journal emptied by retention would reuse seqs the central store already holds), never one past
        ``prunable_seq``."""
        limit = self.prunable_seq() if self.prunable_seq is not None else None
        if self.prunable_seq is not None and limit is None:
            return  # forwarding on, nothing acknowledged yet: keep everything
        deleted = 0
        while True:
            seqs = [r[0] for r in self.conn.execute(
                "SELECT seq FROM inspections WHERE received_at < ? AND seq < (SELECT MAX(seq) FROM inspections) "
                f"AND seq <= ? ORDER BY seq LIMIT {_CHUNK}", [cutoff, limit if limit is not None else 2**62]
            )]  # fmt: skip
            if not seqs:
                break
            marks = ",".join("?" * len(seqs))
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute(f"DELETE FROM detections WHERE inspection_seq IN ({marks})", seqs)
            self.conn.execute(f"DELETE FROM reviews WHERE inspection_seq IN ({marks})", seqs)  # with their records
            self.conn.execute(f"DELETE FROM inspections WHERE seq IN ({marks})", seqs)
            self.conn.execute("COMMIT")
            deleted += len(seqs)
        if deleted:
            logger.info("records: deleted %d record(s) older than records.retention_days", deleted)

    def _remove_orphans(self) -> None:
        """Files under images/ and annotated/ that no live row names: a group that crashed between writing its
        files and committing, or a retention unlink that did not happen. The one walk of the tree."""
        removed = 0
        for top in ("images", "annotated"):
            root = self.data_dir / top
            for dirpath, _dirs, names in os.walk(root):
                for name in names:
                    rel = Path(dirpath, name).relative_to(self.data_dir).as_posix()
                    live = self.conn.execute(
                        "SELECT 1 FROM archive_files WHERE path = ? AND deleted_at IS NULL", [rel]
                    ).fetchone()
                    if live is None:
                        Path(dirpath, name).unlink(missing_ok=True)
                        removed += 1
        if removed:
            self.metrics.archive_deleted.labels(reason="orphan").inc(removed)
            logger.warning("records: removed %d archived file(s) no record refers to (an earlier crash)", removed)
