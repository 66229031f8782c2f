"""Inspection records: one per answered image, in SQLite (WAL) under ``data_dir``, with the NG (and sampled OK)
images archived next to them. :class:`RecordStore` is what the request path talks to: ``add`` hands records to one
writer thread and, in durable mode, returns once they are committed; queries run on their own connections, off the
event loop. docs/records.md has the schema, the durability modes and the failure behaviour.

The record stage of the request path (docs/records.md): every answered image gets its inspection record (and,
NG or sampled, its archived image) and its verdict message for the line's signals, before the answer goes out.

Durable records: the 200 waits for the record's group commit, then for the signal's (so a PLC never hears of a
verdict that has no record). Fast records: both are handed over and the answer goes at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry

from service.core.errors import RecordsUnavailable
from service.core.results import InspectResult
from service.records.metrics import RecordsMetrics, ReviewMetrics
from service.records.query import ImageLookup, QueryFilters, RecordReader
from service.records.record import InspectionRecord
from service.records.reviews import ReviewStore
from service.records.schema import DB_NAME, RecordsSchemaError, open_reader, open_writer
from service.records.writer import GroupWriter, PendingItem, RecordWriteError, Waiter, resolve_all
from service.settings import RecordsSettings, Settings
from service.signals.hub import OutboxError, Signals
from service.signals.sink import GroupQueue, SinkThread

__all__ = ["RecordStage", "RecordStore", "check_data_dir", "verdict_message"]


logger = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass
class _LossLog:
    """One warning per cause per ``every_s``, with the count of losses since the last one: a full disk at 100
    images/s must be visible in the log without writing 100 lines a second."""

    every_s: float = 5.0
    last: dict[str, float] = field(default_factory=dict)
    since: dict[str, int] = field(default_factory=dict)

    def __call__(self, reason: str, n: int, message: str) -> None:
        self.since[reason] = self.since.get(reason, 0) + n
        now = time.monotonic()
        if now - self.last.get(reason, -1e9) >= self.every_s:
            logger.error("%d inspection record(s) lost (%s): %s", self.since.pop(reason), reason, message)
            self.last[reason] = now


class _WriterThread(SinkThread):
    """The store's one writer: takes groups from the queue, commits each (:class:`GroupWriter`), and sweeps the
    retention every ``sweep_interval_s`` (the first sweep at once: it clears what a crash left behind)."""

    def __init__(self, store: RecordStore, writer: GroupWriter) -> None:
        super().__init__("records-writer", "records writer")
        self._store = store
        self.writer = writer
        self._next_sweep = time.monotonic()

    def step(self) -> float | None:
        store = self._store
        group, finished = store.queue.take(store.settings.fast_window_ms / 1000, until=self._next_sweep)
        if group:
            store.write(self.writer, group)
        if finished:
            return None
        if time.monotonic() >= self._next_sweep:
            self._sweep()
            self._next_sweep = time.monotonic() + store.sweep_interval_s
        return 0.0

    def _sweep(self) -> None:
        try:
            self.writer.sweep(time.time())
        except Exception:  # retention failing must not stop the records; it is retried next interval
            logger.exception("records: retention sweep failed")

    def close(self) -> None:
        self.writer.close()


class RecordStore:
    """The records of one service instance: ``data_dir/records.sqlite3`` and the archive under ``data_dir``.

    Call :meth:`start` before :meth:`add`, and ``await close()`` at shutdown (it flushes). ``sweep_interval_s`` is
    how often retention runs (the first sweep, at start, also removes files a crash left unrecorded).
    """

    def __init__(
        self,
        settings: RecordsSettings,
        data_dir: Path,
        registry: CollectorRegistry | None = None,
        *,
        sweep_interval_s: float = 60.0,
        rng: random.Random | None = None,
        prunable_seq: Callable[[], int | None] | None = None,
    ) -> None:
        """``prunable_seq``: the highest seq retention may delete (the central store's acknowledged watermark while
        records are forwarded); None: retention alone decides."""
        self.settings = settings
        self._prunable_seq = prunable_seq
        self.data_dir = data_dir
        self.db_path = data_dir / DB_NAME
        registry = registry or CollectorRegistry()
        self.metrics = RecordsMetrics(registry)
        self.review_metrics = ReviewMetrics(registry)
        self.reviews: ReviewStore | None = None  # the review decisions, once started (docs/review.md)
        self.sweep_interval_s = sweep_interval_s
        self._rng = rng or random.Random()
        self.queue: GroupQueue[PendingItem] = GroupQueue(settings.max_pending)
        self._thread: _WriterThread | None = None
        self._readers = threading.local()
        self._reader_conns: list[Any] = []
        self._log_loss = _LossLog()

    # --- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Open (create, migrate) the database and start the writer thread.

        Raises:
            RecordsSchemaError: the database cannot be used (names the file).
        """
        conn = open_writer(self.db_path, "FULL" if self.settings.durability == "durable" else "NORMAL")
        writer = GroupWriter(conn, self.data_dir, self.settings, self.metrics, self._rng, self._prunable_seq)
        self._thread = _WriterThread(self, writer)
        self._thread.start()
        self.reviews = ReviewStore(self.db_path, self.data_dir, self.review_metrics)
        logger.info(
            "records: %s (%s, on_failure=%s), archive %s bytes",
            self.db_path, self.settings.durability, self.settings.on_failure, writer.archive_bytes,
        )  # fmt: skip

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop accepting records, write every pending one, stop the writer and close the connections, waiting at
        most ``timeout_s``; records still pending past it are logged (the writer goes on until the process ends)."""
        self.queue.close()
        thread = self._thread
        if thread is not None and not await asyncio.to_thread(thread.stop, timeout_s):
            logger.error("records: %d record(s) still pending after %.1f s at close", self.queue.pending, timeout_s)
            return
        for conn in self._reader_conns:
            conn.close()
        self._reader_conns.clear()
        if self.reviews is not None:
            self.reviews.close()

    # --- writing ---------------------------------------------------------------------------------------------

    async def add(self, items: Sequence[tuple[InspectionRecord, bytes | None]]) -> None:
        """Record these images (each with its uploaded bytes, for the archive; None = never archive).

        Durable mode: returns once the records (and archived images) are committed to disk. Fast mode: returns at
        once; they are written within ``fast_window_ms``. A record that cannot be written (pending full, past
        ``max_wait_ms``, a database or disk error) is counted in ``aoi_records_lost_total{reason}`` and logged.

        Raises:
            RecordsUnavailable: only with ``on_failure == "refuse"``, naming the cause and the setting.
        """
        if not items:
            return
        durable = self.settings.durability == "durable"
        waiter = Waiter(asyncio.get_running_loop()) if durable else None
        entries = [PendingItem(record, image, waiter) for record, image in items]
        refused = self._enqueue(entries, durable)
        if refused is not None:
            self._lost(refused[0], len(entries), refused[1])
            return
        if waiter is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.settings.max_wait_ms / 1000)
        except TimeoutError:
            self._gave_up(entries)
        except RecordWriteError as exc:  # already counted and logged by the writer
            self._refuse_if_asked(f"inspection record not written: {exc.message}")

    def _enqueue(self, entries: list[PendingItem], durable: bool) -> tuple[str, str] | None:
        """Queue ``entries`` for the writer, or say why not: (reason, message)."""
        if self.queue.closed or self._thread is None:
            return "closed", "the record store is not running (shutting down, or start() not called)"
        if not self.queue.put(entries, urgent=durable):
            if self.queue.closed:
                return "closed", "the record store is not running (shutting down)"
            return "pending_full", (
                f"records.max_pending ({self.settings.max_pending}) records are already waiting to be written "
                "(the disk is slower than the line)"
            )
        self.metrics.pending.set(self.queue.pending)
        return None

    def _gave_up(self, entries: list[PendingItem]) -> None:
        """A durable ``add`` waited ``max_wait_ms``: records still queued are dropped (lost, reason timeout); ones the
        writer already holds are left to it (it counts them written or lost)."""
        mine = {id(e) for e in entries}
        dropped = self.queue.forget(lambda e: id(e) in mine)
        self.metrics.pending.set(self.queue.pending)
        message = f"not on disk within records.max_wait_ms ({self.settings.max_wait_ms:g} ms)"
        if dropped:
            self._lost("timeout", len(dropped), message)
        else:
            logger.warning("records: commit slower than records.max_wait_ms; the request no longer waits for it")
            self._refuse_if_asked(f"inspection record {message}")

    def _lost(self, reason: str, n: int, message: str) -> None:
        self.metrics.lost.labels(reason=reason).inc(n)
        self._log_loss(reason, n, message)
        self._refuse_if_asked(f"inspection record not written: {message}")

    def _refuse_if_asked(self, message: str) -> None:
        if self.settings.on_failure == "refuse":
            raise RecordsUnavailable(f"{message}; records.on_failure=refuse withholds answers without a record")

    def write(self, writer: GroupWriter, group: list[PendingItem]) -> None:
        """Commit one group (on the writer thread), count it, and answer its waiters."""
        start = time.perf_counter()
        error: RecordWriteError | None = None
        try:
            writer.commit(group)
        except RecordWriteError as exc:
            error = exc
        except Exception as exc:  # a bug: the writer thread must survive it, and say so
            logger.exception("records: unexpected error writing %d record(s)", len(group))
            error = RecordWriteError("internal_error", f"internal error ({type(exc).__name__}); see the log")
        self.queue.done(len(group))
        self.metrics.pending.set(self.queue.pending)
        if error is None:
            self.metrics.written.inc(len(group))
            self.metrics.commit_seconds.observe(time.perf_counter() - start)
            self.metrics.group_size.observe(len(group))
        else:
            self.metrics.lost.labels(reason=error.reason).inc(len(group))
            self._log_loss(error.reason, len(group), error.message)
        resolve_all([e.waiter for e in group if e.waiter is not None], error)

    # --- reading ---------------------------------------------------------------------------------------------

    def _reader(self) -> RecordReader:
        """This thread's reader (one connection per worker thread: sqlite3 connections are not shared)."""
        reader: RecordReader | None = getattr(self._readers, "reader", None)
        if reader is None:
            conn = open_reader(self.db_path)
            self._reader_conns.append(conn)
            reader = RecordReader(conn, self.data_dir)
            self._readers.reader = reader
        return reader

    async def _read(self, fn: Callable[[RecordReader], _T]) -> _T:
        return await asyncio.to_thread(lambda: fn(self._reader()))

    async def query(
        self, filters: QueryFilters | None = None, limit: int = 100, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Records newest first and the next page's cursor (:meth:`RecordReader.query`).

        Raises:
            ValueError: a cursor this API did not return.
        """
        return await self._read(lambda r: r.query(filters or QueryFilters(), limit, cursor))

    async def get(self, request_id: str) -> list[dict[str, Any]]:
        """Every image recorded under ``request_id``, in image-index order."""
        return await self._read(lambda r: r.get(request_id))

    async def image_file(self, request_id: str, index: int, annotated: bool = False) -> ImageLookup:
        """The archived (or annotated) file of one image, or the reason there is none."""
        return await self._read(lambda r: r.image_file(request_id, index, annotated))

    async def integrity_check(self) -> list[str]:
        """SQLite's integrity check plus every kept file present with its sha256; empty when all is well."""
        return await self._read(lambda r: r.integrity_check())


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
