"""The forwarder: ships a station's SQLite journal to the central PostgreSQL in batches, exactly once by key.

Writes use COPY into temporary staging tables, then ``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` (measured faster
than executemany with ON CONFLICT, benchmarks/bench_forward.py). psycopg 3 directly rather than SQLAlchemy Core:
COPY and pipelined statements are first-class there, and nothing here needs an ORM or portability.

The thread is the service's one sink base (:class:`service.signals.sink.SinkThread`) and waits between failed
attempts by its one backoff (:func:`service.signals.sink.backoff_s`, see
:func:`~service.records.central.thread.retry_backoff_s`).
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge

from service.records.archive import fsync_dirs, write_file
from service.records.central.journal import (
    DETECTION_COLUMNS,
    IMAGE_COLUMNS,
    INSPECTION_COLUMNS,
    REVIEW_COLUMNS,
    Batch,
    JournalError,
)
from service.records.central.schema import CentralSchemaError, check_schema, upgrade
from service.records.central.settings import CentralSettings, scrub
from service.records.central.thread import CentralThread, PassError

__all__ = [
    "FAILURE_REASONS",
    "WATERMARK_FILE",
    "ForwardError",
    "ForwardMetrics",
    "Forwarder",
    "read_acknowledged",
    "station_backlog_guard",
]

logger = logging.getLogger(__name__)
FAILURE_REASONS = ("connect", "write", "schema", "internal")
WATERMARK_FILE = "forward.json"

# Staging tables live as long as the connection; ON COMMIT DELETE ROWS empties them with every batch's commit.
_STAGING = tuple(
    f"CREATE TEMP TABLE IF NOT EXISTS fwd_{table} (LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    for table in ("inspections", "detections", "images", "reviews")
)
_TABLES = (
    ("inspections", INSPECTION_COLUMNS), ("detections", DETECTION_COLUMNS), ("images", IMAGE_COLUMNS),
    ("reviews", REVIEW_COLUMNS),
)  # fmt: skip
# A decision whose record central no longer holds (pruned by the plant's retention) is dropped, not refused: the
# foreign key would otherwise fail the batch for ever.
_KEEP = {
    "reviews": "WHERE EXISTS (SELECT 1 FROM inspections i WHERE i.station_id = s.station_id "
    "AND i.seq = s.inspection_seq)"
}


class ForwardError(PassError):
    """One forwarding attempt failed; ``reason`` is one of :data:`FAILURE_REASONS`, the message has no secrets."""


class ForwardMetrics:
    """The forwarder's collectors on the app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.backlog = Gauge("aoi_forward_backlog_records", "Journal records not acknowledged by central", registry=r)
        self.oldest = Gauge(
            "aoi_forward_oldest_unforwarded_seconds", "Age of the oldest record not yet forwarded (0: none)", registry=r
        )
        self.batches = Counter("aoi_forward_batches", "Batches committed to the central database", registry=r)
        self.records = Counter("aoi_forward_records", "Records shipped in committed batches", registry=r)
        self.failures = Counter("aoi_forward_failures", "Failed forwarding attempts, by cause", ["reason"], registry=r)
        for reason in FAILURE_REASONS:
            self.failures.labels(reason=reason)
        self.connected = Gauge(
            "aoi_forward_connected",
            "1 when the last forwarding attempt reached the central store and succeeded; 0 after a failure or stop",
            registry=r,
        )


def read_acknowledged(data_dir: Path, station_id: str) -> int | None:
    """The highest seq central acknowledged for ``station_id``, as last persisted in ``data_dir/forward.json``
    (None: never, or another station id). Retention must not prune records above it."""
    try:
        doc = json.loads((data_dir / WATERMARK_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("station_id") != station_id:
        return None
    seq = doc.get("acknowledged_seq")
    return seq if isinstance(seq, int) else None


def station_backlog_guard(data_dir: Path, station_id: str) -> int | None:
    """The highest journal seq the station's records retention may delete while it forwards to central as
    ``station_id``: the watermark central last acknowledged (``data_dir/forward.json``, written by :class:`Forwarder`
    after each commit and at each connect, lower too when central was restored). None: nothing may be deleted yet
    (central never acknowledged a record of this station, or the file belongs to another station id).

    Retention calls it only when forwarding is configured (a station that does not forward has no guard). NG images
    need no journal record to be uploaded (:class:`~service.records.central.images.ImageForwarder` finds the file by
    the central row's sha256), so the guard is the records' watermark alone.
    """
    acknowledged = read_acknowledged(data_dir, station_id)
    return acknowledged if acknowledged is not None and acknowledged > 0 else None


def _classify(exc: BaseException, stage: str) -> str:
    if isinstance(exc, CentralSchemaError | psycopg.errors.UndefinedTable | psycopg.errors.UndefinedColumn):
        return "schema"
    if isinstance(exc, psycopg.Error):
        return stage
    return "internal"


class Forwarder(CentralThread):
    """Ships ``data_dir/records.sqlite3`` to the central database: ``seq > watermark``, ``batch_size`` records per
    transaction, oldest first.

    The watermark (highest seq central holds for this station) is read from central at every (re)connect, so after
    a restart or ``kill -9`` at most the unacknowledged batch is sent again, and its duplicates are absorbed by the
    key. It is also persisted to ``data_dir/forward.json`` after each commit (:meth:`acknowledged_seq`), for the
    station's retention (:func:`station_backlog_guard`). Failures never escape the background thread: it backs off
    (:func:`~service.records.central.thread.retry_backoff_s` between ``min_backoff_s`` and ``max_backoff_s``) and
    keeps the backlog gauges current
    meanwhile. Memory is bounded by one batch: the backlog stays in the journal.

    Use :meth:`start` (once; a stopped forwarder is not restarted: make a new one) and :meth:`stop` in the service's
    lifespan and :meth:`wake` after records are committed, or call :meth:`forward_once` directly (tests, benchmarks,
    ``aoi`` commands) when the thread is not running.
    """

    error_type = ForwardError
    log_prefix = "central records"

    def __init__(
        self,
        settings: CentralSettings,
        data_dir: Path,
        registry: CollectorRegistry | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__("records-forwarder", "central records forwarder", settings, data_dir, rng)
        self.metrics = ForwardMetrics(registry or CollectorRegistry())
        self._watermark: int | None = None  # central's, known while connected
        self._review_watermark = 0  # central's highest review_seq of this station, read at each connect
        self._acknowledged = read_acknowledged(data_dir, settings.station_id)
        self._backlog = 0
        self._oldest_s = 0.0
        self._refreshed_at = -1.0  # monotonic time the backlog was last read from the journal
        self._last_success_at: float | None = None

    # --- public API ------------------------------------------------------------------------------------------

    def acknowledged_seq(self) -> int | None:
        """Highest seq central has acknowledged (None: none yet); journal records above it must not be pruned."""
        return self._acknowledged

    def forward_once(self) -> int:
        """Ship at most one batch: records, and the review decisions of records central then holds; return how many
        records and decisions it held (0: nothing to send).

        Raises:
            ForwardError: nothing was acknowledged in this call (the next call reconnects and resends).
        """
        with self._lock:
            stage = "connect"
            try:
                conn, watermark = self._connected()
                stage = "write"
                self._check_journal_not_behind(watermark)
                batch = self._journal.read(watermark, self.settings.batch_size)
                batch.reviews, batch.last_review_seq = self._journal.read_reviews(
                    self._review_watermark, batch.last_seq, self.settings.batch_size
                )
                if batch.inspections or batch.reviews:
                    self._write_batch(conn, batch)
                    self._review_watermark = batch.last_review_seq
                if batch.inspections:
                    self._acknowledge(batch.last_seq, len(batch.inspections))
            except Exception as exc:
                raise self._failed(exc, stage) from None
            self._refresh_backlog()
            self.metrics.connected.set(1)
            if self._failures:
                logger.info("central records: forwarding again after %d failed attempt(s)", self._failures)
                self._failures = 0
            return len(batch.inspections) + len(batch.reviews)

    def wait_drained(self, timeout_s: float) -> bool:
        """Wake the thread and wait until the backlog, read after this call began, is 0 (a pod's preStop); False at
        the timeout."""
        start = time.monotonic()
        deadline = start + timeout_s
        while time.monotonic() < deadline:
            self.wake()
            if self._watermark is not None and self._backlog == 0 and self._refreshed_at >= start:
                return True
            time.sleep(0.05)
        return False

    def state(self) -> dict[str, Any]:
        """JSON-ready status (no secrets): connected, watermark, acknowledged seq, backlog, last error."""
        return {
            "station_id": self.settings.station_id,
            "line_id": self.settings.line_id,
            "connected": self._conn is not None and not self._conn.closed,
            "watermark": self._watermark,
            "acknowledged_seq": self._acknowledged,
            "backlog": self._backlog if self._refreshed_at >= 0 else None,  # None: not read from the journal yet
            "oldest_unforwarded_s": round(self._oldest_s, 3),
            "consecutive_failures": self._failures,
            "last_success_at": self._last_success_at,
            "last_error": dict(self._last_error) if self._last_error else None,
        }

    # --- one batch -------------------------------------------------------------------------------------------

    def _connected(self) -> tuple[psycopg.Connection[Any], int]:
        """The open connection and central's watermark, connecting (and reading the watermark) when needed."""
        if self._conn is not None and not self._conn.closed and self._watermark is not None:
            return self._conn, self._watermark
        self._close_conn()
        if self.settings.migrate:
            upgrade(self._dsn)
        conn = psycopg.connect(self._dsn, autocommit=True, **self.settings.connect_kwargs())
        try:
            check_schema(conn)
            for sql in _STAGING:
                conn.execute(sql)
            row = conn.execute(
                "SELECT max(seq) FROM inspections WHERE station_id = %s", [self.settings.station_id]
            ).fetchone()
            watermark = int(row[0]) if row is not None and row[0] is not None else 0
            self._check_identity(conn, watermark)
            row = conn.execute(
                "SELECT max(review_seq) FROM reviews WHERE station_id = %s", [self.settings.station_id]
            ).fetchone()
            self._review_watermark = int(row[0]) if row is not None and row[0] is not None else 0
        except BaseException:
            conn.close()
            raise
        self._conn, self._watermark = conn, watermark
        self._persist(watermark)
        logger.info(
            "central records: station %s connected to %s; central holds seq <= %d",
            self.settings.station_id,
            scrub(self._dsn, self._dsn),
            watermark,
        )
        return conn, watermark

    def _check_identity(self, conn: psycopg.Connection[Any], watermark: int) -> None:
        """Refuse a journal that is not the one central knows (replaced, or a station id used twice): its records
        would collide with other records' keys and be dropped as duplicates."""
        if watermark == 0:
            return
        mine = self._journal.identity(watermark)
        if mine is None:
            return  # pruned locally, or not there yet: _check_journal_not_behind catches a reset
        row = conn.execute(
            "SELECT request_id, extract(epoch FROM received_at) FROM inspections WHERE station_id = %s AND seq = %s",
            [self.settings.station_id, watermark],
        ).fetchone()
        if row is not None and (row[0] != mine[0] or abs(float(row[1]) - mine[1]) > 1e-3):
            raise ForwardError(
                "internal",
                f"journal record seq {watermark} ({mine[0]!r}) differs from central's ({row[0]!r}) for station "
                f"{self.settings.station_id!r}: the journal was replaced or the station id is shared; not forwarding",
            )

    def _check_journal_not_behind(self, watermark: int) -> None:
        top = self._journal.max_seq()
        if top is not None and top < watermark:
            raise ForwardError(
                "internal",
                f"journal ends at seq {top} but central already holds seq {watermark} for station "
                f"{self.settings.station_id!r}: the journal was reset; its new records would collide, not forwarding",
            )

    def _write_batch(self, conn: psycopg.Connection[Any], batch: Batch) -> None:
        """One transaction: COPY each table's rows into its staging table, then insert what central lacks."""
        with conn.transaction(), conn.cursor() as cur:
            for table, columns in _TABLES:
                rows: list[tuple[Any, ...]] = getattr(batch, table)
                if not rows:
                    continue
                names = ", ".join(columns)
                with cur.copy(f"COPY fwd_{table} ({names}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
                keep = _KEEP.get(table, "")
                cur.execute(
                    f"INSERT INTO {table} ({names}) SELECT {names} FROM fwd_{table} s {keep} ON CONFLICT DO NOTHING"
                )

    def _acknowledge(self, seq: int, records: int) -> None:
        self._watermark = seq
        self.metrics.batches.inc()
        self.metrics.records.inc(records)
        self._last_success_at = time.time()
        self._persist(seq)

    def _persist(self, seq: int) -> None:
        """Write ``forward.json`` atomically when the acknowledged seq changed (lower too: central was restored)."""
        if seq == self._acknowledged:
            return
        doc = {"station_id": self.settings.station_id, "acknowledged_seq": seq, "updated_at": time.time()}
        self.data_dir.mkdir(parents=True, exist_ok=True)
        dirty: set[Path] = set()
        write_file(self.data_dir, WATERMARK_FILE, json.dumps(doc).encode(), dirty)  # temp file, fsync, rename
        fsync_dirs(dirty)
        self._acknowledged = seq

    def _failed(self, exc: Exception, stage: str) -> ForwardError:
        """Count, record and log a failure; drop the connection (the next attempt reconnects and re-reads the
        watermark); return the error to raise, its message scrubbed of the DSN's password."""
        if isinstance(exc, ForwardError):
            error = ForwardError(exc.reason, scrub(exc.message, self._dsn))
        else:
            reason = _classify(exc, stage)
            error = ForwardError(reason, scrub(f"{type(exc).__name__}: {exc}".strip(), self._dsn))
        self.metrics.failures.labels(reason=error.reason).inc()
        self.metrics.connected.set(0)
        self._close_conn()
        self._failures += 1
        previous = self._last_error["message"] if self._last_error else None
        self._last_error = {"reason": error.reason, "message": error.message, "at": time.time()}
        level = logging.WARNING if self._failures == 1 or error.message != previous else logging.DEBUG
        logger.log(
            level,
            "central records: forwarding failed (%s, attempt %d): %s",
            error.reason,
            self._failures,
            error.message,
        )
        try:
            self._refresh_backlog()
        except Exception as refresh_exc:  # the journal itself failing must not hide the first error
            logger.debug("central records: backlog unknown (%s)", refresh_exc)
        return error

    def _refresh_backlog(self) -> None:
        """Backlog gauges from the journal: records above the watermark (max seq - watermark: seqs have no gaps
        above it, retention only removes old ones) and the age of the oldest of them."""
        watermark = self._watermark if self._watermark is not None else (self._acknowledged or 0)
        try:
            top = self._journal.max_seq()
            oldest = self._journal.oldest_after(watermark)
        except (sqlite3.Error, JournalError) as exc:
            logger.debug("central records: cannot read the journal for the backlog (%s)", exc)
            return
        self._backlog = max(0, (top or 0) - watermark)
        self._oldest_s = max(0.0, time.time() - oldest) if oldest is not None else 0.0
        self._refreshed_at = time.monotonic()
        self.metrics.backlog.set(self._backlog)
        self.metrics.oldest.set(self._oldest_s)

    def _close_conn(self) -> None:
        self._watermark = None  # central's, read again at the next connect
        super()._close_conn()

    # --- the thread (CentralThread) -------------------------------------------------------------------------

    def run_pass(self) -> int:
        return self.forward_once()

    def full(self, done: int) -> bool:
        return done >= self.settings.batch_size

    def close(self) -> None:
        super().close()
        self.metrics.connected.set(0)

    def refresh_gauges(self) -> None:
        with self._lock:
            self._refresh_backlog()
