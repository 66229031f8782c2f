"""NG image uploads: the station's archived images that central lists as ``pending`` go to the object store, one at a
time, and central's row says ``stored`` only once the object is verified.

The records forwarder (:mod:`service.records.central.forwarder`) writes one ``images`` row per forwarded record
whose image is archived on the station (the journal's live ``archive_files`` row): ``pending``, the sha256 the
record states, the file's size. :class:`ImageForwarder` settles those rows, oldest first:

- reads the file from the station's archive (``data_dir/images/YYYY/MM/DD/<sha256>.<ext>``, found through the
  journal: the record's ``image_file_id``, else a live file of the same bytes), checks its sha256 against the row's,
- uploads it (:class:`~service.records.central.objects.ObjectStore`: the S3 backend checks Content-MD5 on the way
  in and size and sha256 after; the directory backend reads the file back),
- then, in one statement, sets the row ``stored`` with the object's key, its size and the time.

A crash between the upload and that statement uploads the same bytes to the same key again (no duplicate object).
An image whose station file is gone (deleted by the station's archive retention, or missing from disk) or no longer
has the bytes the record states is marked ``missing``: it can never be stored, so it is not retried. A failed upload
(the object store down or refusing, a central or journal error) leaves the row ``pending``; the thread backs off
(:func:`~service.records.central.thread.retry_backoff_s`) and tries the same image again.
"""

from __future__ import annotations

import hashlib
import logging
import random
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge

from service.records.central.journal import ArchivedFile, JournalError
from service.records.central.objects import ObjectStore, ObjectStoreError, object_key
from service.records.central.schema import check_schema
from service.records.central.settings import CentralSettings, scrub
from service.records.central.thread import CentralThread, PassError

__all__ = ["IMAGE_RESULTS", "ImageForwardError", "ImageForwardMetrics", "ImageForwarder"]

logger = logging.getLogger(__name__)
IMAGE_RESULTS = ("stored", "missing", "failed")

_PENDING = """SELECT img.seq, img.sha256, i.request_id, i.image_index, extract(epoch FROM i.received_at)::float8
    FROM images img JOIN inspections i ON i.station_id = img.station_id AND i.seq = img.seq
    WHERE img.station_id = %s AND img.kind = 'image' AND img.state = 'pending'
    ORDER BY img.seq LIMIT %s"""
_STORED = """UPDATE images SET state = 'stored', object_key = %s, bytes = %s, stored_at = now()
    WHERE station_id = %s AND seq = %s AND kind = 'image' AND state = 'pending'"""
_MISSING = """UPDATE images SET state = 'missing'
    WHERE station_id = %s AND seq = %s AND kind = 'image' AND state = 'pending'"""
_TOTALS = """SELECT count(*), coalesce(sum(bytes), 0) FROM images
    WHERE station_id = %s AND kind = 'image' AND state = 'pending'"""


class ImageForwardError(PassError):
    """One upload pass stopped; ``reason``: ``central`` (database), ``store`` (object store), ``journal`` (the
    station's SQLite or archive file). The message has no secrets."""


class ImageForwardMetrics:
    """The image uploader's collectors on the app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.pending = Gauge(
            "aoi_forward_images_pending",
            "NG images central lists as pending for this station (forwarded, not yet uploaded)",
            registry=r,
        )
        self.pending_bytes = Gauge(
            "aoi_forward_images_pending_bytes", "Bytes of the NG images central lists as pending", registry=r
        )
        self.images = Counter(
            "aoi_forward_images",
            "NG image upload outcomes: stored (uploaded and verified), missing (the station's file was gone first), "
            "failed (an attempt that left the image pending; it is retried)",
            ["result"],
            registry=r,
        )
        for result in IMAGE_RESULTS:
            self.images.labels(result=result)


@dataclass(frozen=True)
class _Pending:
    seq: int
    sha256: str
    request_id: str
    image_index: int
    received_at: float


class ImageForwarder(CentralThread):
    """Uploads the station's NG images that central lists as ``pending`` to ``store``, ``batch_size`` rows per pass,
    one image in memory at a time (module docstring: the rules).

    Object keys are ``station_id/yyyy/mm/dd/request_id-index-seq.ext`` (:func:`object_key`): the design's
    ``request_id-index`` plus the record's ``seq``, so two records of a reused request id never share an object.

    Use :meth:`start` (once) and :meth:`stop` beside the records :class:`~service.records.central.forwarder.Forwarder`
    (:meth:`wake` after it forwarded a batch, or let it poll every ``poll_interval_s``), or call :meth:`upload_once`
    directly when the thread is not running.
    """

    error_type = ImageForwardError
    log_prefix = "central images"

    def __init__(
        self,
        settings: CentralSettings,
        data_dir: Path,
        store: ObjectStore,
        registry: CollectorRegistry | None = None,
        *,
        batch_size: int = 20,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__("records-images", "central image uploader", settings, data_dir, rng)
        self.store = store
        self.batch_size = max(1, batch_size)
        self.metrics = ImageForwardMetrics(registry or CollectorRegistry())
        self._pending: int | None = None  # central's count, as last seen
        self._pending_bytes = 0
        self._counted_at = -1.0  # monotonic time of the last count
        self._last_stored_at: float | None = None

    # --- public API ------------------------------------------------------------------------------------------

    def upload_once(self) -> int:
        """Settle up to ``batch_size`` pending images, oldest first; return how many were settled (stored or marked
        missing; 0: none pending, or the uploader was stopped).

        Raises:
            ImageForwardError: an image could not be settled (it stays pending, as do the ones after it); counted
                as ``failed`` when an image was being settled.
        """
        with self._lock:
            try:
                conn = self._connected()
                rows = conn.execute(_PENDING, [self.settings.station_id, self.batch_size]).fetchall()
            except Exception as exc:
                raise self._failed("central", exc, image=False) from None
            settled, missing = 0, 0
            for row in rows:
                if self.stopping:
                    break
                stored = self._settle(conn, _Pending(int(row[0]), str(row[1]), str(row[2]), int(row[3]), row[4]))
                settled += 1
                missing += not stored
            if missing:
                logger.warning("central images: %d image(s) marked missing (station file gone before upload)", missing)
            try:
                self._refresh_pending(conn)
            except Exception as exc:
                raise self._failed("central", exc, image=False) from None
            if self._failures:
                logger.info("central images: uploading again after %d failed attempt(s)", self._failures)
                self._failures = 0
            return settled

    def wait_drained(self, timeout_s: float) -> bool:
        """Wake the thread and wait until central, asked after this call began, lists no pending image of this
        station; False at the timeout."""
        start = time.monotonic()
        deadline = start + timeout_s
        while time.monotonic() < deadline:
            self.wake()
            if self._pending == 0 and self._counted_at >= start:
                return True
            time.sleep(0.05)
        return False

    def state(self) -> dict[str, Any]:
        """JSON-ready status (no secrets): pending images and bytes as last seen, failures, last error."""
        return {
            "station_id": self.settings.station_id,
            "connected": self._conn is not None and not self._conn.closed,
            "pending": self._pending,
            "pending_bytes": self._pending_bytes,
            "consecutive_failures": self._failures,
            "last_stored_at": self._last_stored_at,
            "last_error": dict(self._last_error) if self._last_error else None,
        }

    # --- one image -------------------------------------------------------------------------------------------

    def _settle(self, conn: psycopg.Connection[Any], p: _Pending) -> bool:
        """Upload one image and mark it stored (True), or mark it missing (False).

        Raises:
            ImageForwardError: it stays pending (counted as failed).
        """
        station = self.settings.station_id
        try:
            found = self._journal.image_file(p.seq, p.sha256)
        except (sqlite3.Error, JournalError) as exc:
            raise self._failed("journal", exc, image=True) from None
        data, why = self._read_local(found, p)
        if data is None or found is None:
            logger.debug("central images: seq %d marked missing: %s", p.seq, why)
            self._update(conn, _MISSING, [station, p.seq])
            self.metrics.images.labels(result="missing").inc()
            return False
        ext = Path(found.path).suffix.lstrip(".") or "bin"
        key = object_key(station, p.received_at, p.request_id, p.image_index, ext, p.seq)
        try:
            stored = self.store.put(key, data, p.sha256)
        except Exception as exc:  # ObjectStoreError, or a client that could not even be asked (configuration)
            raise self._failed("store", exc, image=True) from None
        if stored.sha256 != p.sha256.lower() or stored.bytes != len(data):
            message = f"{key}: the store reports {stored.bytes} bytes, sha256 {stored.sha256[:16]}...; not the image"
            raise self._failed("store", ObjectStoreError(message), image=True)
        self._update(conn, _STORED, [stored.key, stored.bytes, station, p.seq])
        self.metrics.images.labels(result="stored").inc()
        self._last_stored_at = time.time()
        return True

    def _read_local(self, found: ArchivedFile | None, p: _Pending) -> tuple[bytes | None, str]:
        """The archived bytes of ``p``, or None and why it can never be uploaded.

        Raises:
            ImageForwardError: the file is there but cannot be read (permissions, I/O): retried.
        """
        if found is None:
            return None, "the journal has no archive file of it (record and file both gone)"
        if found.deleted_at is not None:
            return None, f"deleted by the station's archive retention ({found.deleted_reason or 'unknown'})"
        try:
            data = (self.data_dir / found.path).read_bytes()
        except FileNotFoundError:
            return None, f"{found.path} is not on disk"
        except OSError as exc:
            raise self._failed("journal", exc, image=True) from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != p.sha256.lower():
            logger.error("central images: %s has sha256 %s, record seq %d says %s: corrupt, marked missing",
                         found.path, actual[:16], p.seq, p.sha256[:16])  # fmt: skip
            return None, "corrupt"
        return data, ""

    def _update(self, conn: psycopg.Connection[Any], sql: str, params: list[Any]) -> None:
        try:
            conn.execute(sql, params)
        except Exception as exc:
            raise self._failed("central", exc, image=True) from None

    # --- central -------------------------------------------------------------------------------------------------

    def _connected(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        kwargs = {**self.settings.connect_kwargs(), "application_name": f"aoi-images/{self.settings.station_id}"[:63]}
        conn = psycopg.connect(self._dsn, autocommit=True, **kwargs)
        try:
            check_schema(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _refresh_pending(self, conn: psycopg.Connection[Any]) -> None:
        row = conn.execute(_TOTALS, [self.settings.station_id]).fetchone()
        self._pending, self._pending_bytes = (int(row[0]), int(row[1])) if row is not None else (0, 0)
        self._counted_at = time.monotonic()
        self.metrics.pending.set(self._pending)
        self.metrics.pending_bytes.set(self._pending_bytes)

    def _failed(self, reason: str, exc: BaseException, *, image: bool) -> ImageForwardError:
        """Count (``failed`` when an image was being settled), record and log a failure; a central error drops the
        connection; return the error to raise, its message scrubbed of the DSN's password."""
        text = exc.message if isinstance(exc, ImageForwardError) else f"{type(exc).__name__}: {exc}".strip()
        error = ImageForwardError(reason, scrub(text, self._dsn))
        if image:
            self.metrics.images.labels(result="failed").inc()
        if reason == "central":
            self._close_conn()
        self._failures += 1
        previous = self._last_error["message"] if self._last_error else None
        self._last_error = {"reason": error.reason, "message": error.message, "at": time.time()}
        level = logging.WARNING if self._failures == 1 or error.message != previous else logging.DEBUG
        logger.log(level, "central images: upload failed (%s, attempt %d): %s", reason, self._failures, error.message)
        return error

    # --- the thread (CentralThread) -------------------------------------------------------------------------

    def run_pass(self) -> int:
        return self.upload_once()

    def full(self, done: int) -> bool:
        return done >= self.batch_size

    def refresh_gauges(self) -> None:
        """The pending gauges while backing off (the object store is down: central is not), when connected."""
        with self._lock:
            if self._conn is None or self._conn.closed:
                return
            try:
                self._refresh_pending(self._conn)
            except Exception as exc:
                logger.debug("central images: pending images unknown (%s)", type(exc).__name__)
                self._close_conn()
