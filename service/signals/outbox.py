"""The signal outbox: verdict messages waiting for a sink, in SQLite (WAL) under ``data_dir`` so they survive restarts.

One row per (sink, message). A writer thread commits what ``Signals.publish`` hands it in group commits; the sink
senders read rows in id order and delete them once delivered. Each sink holds at most ``max_per_sink`` rows: past it
the oldest are dropped (a line that was down for days wants the latest verdicts, not last week's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from service.signals.sink import GroupQueue, SinkThread

__all__ = ["FAST_WINDOW_S", "MAX_BACKLOG_ROWS", "Outbox", "OutboxEntry", "OutboxError", "OutboxRow", "OutboxWriter"]

logger = logging.getLogger(__name__)

FAST_WINDOW_S = 0.1  # non-durable rows are committed within this; what a killed process can lose
MAX_BACKLOG_ROWS = 10_000  # rows handed to the writer and not yet committed (a slow disk must not eat memory)
_BUSY_TIMEOUT_MS = 5000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids never reused, so "id > cursor" stays correct
    sink TEXT NOT NULL,
    message_id TEXT NOT NULL,
    enqueued_at REAL NOT NULL,              -- unix seconds
    payload TEXT NOT NULL                   -- the message as sent (JSON)
);
CREATE INDEX IF NOT EXISTS outbox_sink_id ON outbox (sink, id);
"""


class OutboxError(Exception):
    """Messages could not be put in the outbox (disk error, or the writer's backlog is full)."""


@dataclass(frozen=True)
class OutboxRow:
    """A message for one sink, before it is written."""

    sink: str
    message_id: str  # stable across retries and restarts: the receiver's de-duplication key
    enqueued_at: float  # unix seconds
    payload: str  # JSON


@dataclass(frozen=True)
class OutboxEntry:
    """A row read back from the outbox (``id`` orders the rows of a sink)."""

    id: int
    sink: str
    message_id: str
    enqueued_at: float
    payload: str


class Outbox:
    """The SQLite file and the count of rows per sink (kept in memory from the row counts of every change).

    Each thread opens its own connection with :meth:`connect`. Args:
        path: the SQLite file (created with its folder).
        max_per_sink: rows kept per sink; the oldest beyond it are deleted when new rows are written.
        on_pending: called with (sink, rows) after every change of a sink's row count.
    """

    def __init__(self, path: Path, max_per_sink: int, on_pending: Callable[[str, int], None]) -> None:
        self.path = path
        self.max_per_sink = max_per_sink
        self._on_pending = on_pending
        self._pending: Counter[str] = Counter()
        self._lock = threading.Lock()

    def open(self) -> dict[str, int]:
        """Create the file and table if needed; returns the rows waiting per sink (from an earlier run)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self.connect(synchronous="FULL")
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            counts = dict(conn.execute("SELECT sink, COUNT(*) FROM outbox GROUP BY sink").fetchall())
        finally:
            conn.close()
        with self._lock:
            self._pending = Counter(counts)
        for sink, n in counts.items():
            self._on_pending(sink, n)
        return counts

    def connect(self, *, synchronous: str = "NORMAL") -> sqlite3.Connection:
        """A connection for the calling thread, in autocommit mode (transactions are explicit).

        ``synchronous`` FULL for the writer (a durable publish is on disk when it returns); NORMAL is enough for
        deletes: one lost on a power cut only means that message is sent again, which at-least-once allows.
        """
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        return conn

    def pending(self, sink: str) -> int:
        """Rows waiting for ``sink``."""
        with self._lock:
            return self._pending[sink]

    def head(self, conn: sqlite3.Connection, sink: str, *, after_id: int = 0, limit: int = 64) -> list[OutboxEntry]:
        """The oldest rows of ``sink`` with an id above ``after_id``, in id order."""
        rows = conn.execute(
            "SELECT id, sink, message_id, enqueued_at, payload FROM outbox WHERE sink = ? AND id > ? ORDER BY id "
            "LIMIT ?",
            (sink, after_id, limit),
        ).fetchall()
        return [OutboxEntry(*row) for row in rows]

    def delete(self, conn: sqlite3.Connection, sink: str, ids: Sequence[int]) -> int:
        """Delete delivered (or rejected) rows; returns how many were still there (the writer may have dropped some)."""
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        deleted = conn.execute(f"DELETE FROM outbox WHERE id IN ({marks})", tuple(ids)).rowcount
        self._adjust(sink, -deleted)
        return deleted

    def insert(self, conn: sqlite3.Connection, rows: Sequence[OutboxRow]) -> dict[str, int]:
        """Write ``rows`` in one transaction and trim each sink to ``max_per_sink``; returns the rows dropped per sink.

        Raises:
            sqlite3.Error: the transaction was rolled back (nothing written).
        """
        added = Counter(row.sink for row in rows)
        dropped: dict[str, int] = {}
        conn.execute("BEGIN IMMEDIATE")  # the write lock now: the counts below cannot change under us
        try:
            conn.executemany(
                "INSERT INTO outbox (sink, message_id, enqueued_at, payload) VALUES (?, ?, ?, ?)",
                [(r.sink, r.message_id, r.enqueued_at, r.payload) for r in rows],
            )
            for sink, n in added.items():
                if self.pending(sink) + n <= self.max_per_sink:
                    continue  # cheap path: the in-memory count says it fits
                (count,) = conn.execute("SELECT COUNT(*) FROM outbox WHERE sink = ?", (sink,)).fetchone()
                excess = count - self.max_per_sink
                if excess > 0:
                    dropped[sink] = conn.execute(
                        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE sink = ? ORDER BY id LIMIT ?)",
                        (sink, excess),
                    ).rowcount
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        for sink, n in added.items():
            self._adjust(sink, n - dropped.get(sink, 0))
        return dropped

    def _adjust(self, sink: str, delta: int) -> None:
        if delta == 0:
            return
        with self._lock:
            self._pending[sink] += delta
            n = self._pending[sink]
        self._on_pending(sink, n)


@dataclass
class _Batch:
    rows: Sequence[OutboxRow]
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[None] | None = None  # durable: resolved once committed
    flushed: threading.Event | None = None  # a flush barrier (no rows)

    @property
    def urgent(self) -> bool:
        return self.future is not None or self.flushed is not None


def _resolve(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # the publishing task was cancelled: the rows are written all the same
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class OutboxWriter(SinkThread):
    """The thread that writes rows into the :class:`Outbox`: group commits, so one fsync covers every pending row.

    A durable batch (or a flush) is committed as soon as the thread sees it, together with everything queued; other
    rows wait at most :data:`FAST_WINDOW_S` to share a commit. Args:
        outbox: the store.
        on_committed: called (on the writer thread) with the sinks that got new rows.
        on_dropped: called with (sink, reason, rows) for rows that were not kept.
    """

    def __init__(
        self,
        outbox: Outbox,
        on_committed: Callable[[set[str]], None],
        on_dropped: Callable[[str, str, int], None],
    ) -> None:
        super().__init__("aoi-outbox-writer", "signal outbox writer")
        self._outbox = outbox
        self._on_committed = on_committed
        self._on_dropped = on_dropped
        self._queue: GroupQueue[_Batch] = GroupQueue(MAX_BACKLOG_ROWS)  # counts rows queued and not committed
        self._conn: sqlite3.Connection | None = None

    def submit(
        self,
        rows: Sequence[OutboxRow],
        loop: asyncio.AbstractEventLoop | None = None,
        future: asyncio.Future[None] | None = None,
    ) -> None:
        """Queue ``rows``; ``future`` (of ``loop``) is resolved when they are committed.

        Raises:
            OutboxError: the backlog is full or the writer stopped (the rows are dropped and counted).
        """
        batch = _Batch(rows, loop, future)
        if not self._queue.put([batch], urgent=batch.urgent, count=len(rows)):
            reason = "closed" if self._queue.closed else "backlog_full"
            for sink, n in Counter(r.sink for r in rows).items():
                self._on_dropped(sink, reason, n)
            if reason == "closed":
                raise OutboxError("the outbox writer has stopped (shutting down)")
            raise OutboxError(f"the outbox writer is {MAX_BACKLOG_ROWS} rows behind (slow or failing disk)")

    def flush(self, timeout_s: float) -> bool:
        """Block until every row submitted before is committed; False if that took longer than ``timeout_s``."""
        if not self.alive:
            return True
        done = threading.Event()
        if not self._queue.put([_Batch((), flushed=done)], urgent=True, count=0):
            return True  # stopping: stop() drains what is queued
        return done.wait(timeout_s)

    def stop(self, timeout_s: float) -> bool:
        """Commit what is queued, then end the thread."""
        self._queue.close()
        return super().stop(timeout_s)

    def open(self) -> None:
        self._conn = self._outbox.connect(synchronous="FULL")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def step(self) -> float | None:
        batches, finished = self._queue.take(FAST_WINDOW_S)
        if batches:
            assert self._conn is not None
            self._commit(self._conn, batches)
        return None if finished else 0.0

    def _commit(self, conn: sqlite3.Connection, batches: Iterable[_Batch]) -> None:
        batches = list(batches)
        rows = [row for b in batches for row in b.rows]
        error: BaseException | None = None
        try:
            if rows:
                for sink, n in self._outbox.insert(conn, rows).items():
                    self._on_dropped(sink, "outbox_full", n)
        except sqlite3.Error as exc:
            logger.error(
                "signal outbox: could not write %d messages to %s", len(rows), self._outbox.path, exc_info=True
            )
            error = OutboxError(f"could not write to the signal outbox: {exc}")
            for sink, n in Counter(r.sink for r in rows).items():
                self._on_dropped(sink, "write_failed", n)
        self._queue.done(len(rows))
        for b in batches:
            if b.future is not None and b.loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                    b.loop.call_soon_threadsafe(_resolve, b.future, error)
            if b.flushed is not None:
                b.flushed.set()
        if rows and error is None:
            self._on_committed({r.sink for r in rows})
