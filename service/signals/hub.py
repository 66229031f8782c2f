"""Verdict signals to the production line: every answered image's verdict goes to a webhook and/or an MQTT broker,
through an outbox on disk that survives restarts and outages of the receiver (docs/signals.md).

Delivery is at least once and in publishing order per sink. The event loop only hands messages over: the outbox
writer (SQLite group commits) and one sender thread per sink do the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from service.settings import SignalsSettings
from service.signals.metrics import SignalMetrics
from service.signals.mqtt import MqttSender
from service.signals.outbox import FAST_WINDOW_S, Outbox, OutboxError, OutboxRow, OutboxWriter
from service.signals.sink import SinkThread
from service.signals.webhook import WebhookSender

__all__ = ["FAST_WINDOW_S", "OUTBOX_FILE", "OutboxError", "Signals"]

logger = logging.getLogger(__name__)

OUTBOX_FILE = "outbox.sqlite3"  # under data_dir
_POLL_S = 0.05


class Signals:
    """The configured sinks, their outbox and their threads.

    Args:
        settings: ``Settings.signals``; a sink is on when its ``url`` / ``host`` is set.
        data_dir: ``Settings.data_dir``; the outbox is ``data_dir/outbox.sqlite3``.
        registry: where the ``aoi_signals_*`` collectors are registered (the app's, so /metrics shows them).

    Call :meth:`start` once (in the lifespan, before the first publish), :meth:`close` once at shutdown.
    """

    def __init__(self, settings: SignalsSettings, data_dir: Path, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.path = data_dir / OUTBOX_FILE
        self.metrics = SignalMetrics(registry)
        self._only_ng: dict[str, bool] = {}
        if settings.webhook.url is not None:
            self._only_ng["webhook"] = settings.webhook.only_ng
        if settings.mqtt.host is not None:
            self._only_ng["mqtt"] = settings.mqtt.only_ng
        for sink in self._only_ng:
            self.metrics.init_sink(sink)
        self._outbox = Outbox(self.path, settings.outbox_max, self.metrics.pending)
        self._writer = OutboxWriter(self._outbox, self._wake, self.metrics.dropped)
        self._senders: dict[str, SinkThread] = {}
        self._state = "new"  # new -> started -> closing -> closed

    @property
    def enabled(self) -> bool:
        """True when at least one sink is configured (otherwise :meth:`publish` does nothing, no file is made)."""
        return bool(self._only_ng)

    @property
    def sinks(self) -> tuple[str, ...]:
        """The configured sinks: ``webhook``, ``mqtt``."""
        return tuple(self._only_ng)

    def pending(self, sink: str) -> int:
        """Messages waiting in the outbox for ``sink``."""
        return self._outbox.pending(sink)

    def start(self) -> None:
        """Open (or create) the outbox and start the writer and the sender threads. Messages left by an earlier run
        are sent first. Never waits for a receiver: one that is down is retried in the background.

        Raises:
            sqlite3.Error, OSError: the outbox cannot be opened (a settings-level problem: fail the startup).
        """
        if self._state != "new":
            raise RuntimeError("Signals.start() called twice")
        if self.enabled:
            self._start_threads()
        self._state = "started"

    def _start_threads(self) -> None:
        waiting = self._outbox.open()
        for sink, n in waiting.items():
            if sink in self._only_ng:
                logger.info("signals: %d %s message(s) from an earlier run waiting in %s", n, sink, self.path)
            else:
                logger.warning("signals: %d message(s) for %s, which is not configured, stay in %s", n, sink, self.path)
        if self.settings.webhook.url is not None:
            self._senders["webhook"] = WebhookSender(self.settings.webhook, self._outbox, self.metrics)
        if self.settings.mqtt.host is not None:
            self._senders["mqtt"] = MqttSender(self.settings.mqtt, self._outbox, self.metrics)
        self._writer.start()
        for sender in self._senders.values():
            sender.start()
        logger.info(
            "signals: sending to %s (outbox %s, at most %d each)",
            ", ".join(self.sinks),
            self.path,
            self.settings.outbox_max,
        )

    async def publish(self, messages: Sequence[Mapping[str, Any]], *, durable: bool) -> None:
        """Put ``messages`` (verdict dicts, JSON-able; only ``verdict`` and ``camera_id`` are read here) in the
        outbox of every configured sink that wants them (``only_ng``).

        ``durable=True`` returns once they are committed to disk (fsync); ``durable=False`` returns at once and the
        writer commits them within :data:`FAST_WINDOW_S`: what a killed process can lose. Neither waits for the
        receivers.

        Raises:
            OutboxError: durable only: the messages could not be written (disk error, writer backlog full).
            TypeError: a message is not JSON-serialisable (a caller bug).
        """
        if not self.enabled:
            return
        rows = self._rows(messages)
        if not rows:
            return
        if self._state != "started":  # not started, or closing: the writer may be gone, a future would never resolve
            for sink, n in Counter(r.sink for r in rows).items():
                self.metrics.dropped(sink, "closed", n)
            return
        if not durable:
            # A full backlog is counted (backlog_full) and logged by the metrics; a fast publish never raises for it.
            with contextlib.suppress(OutboxError):
                self._writer.submit(rows)
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._writer.submit(rows, loop, future)
        await future

    def _rows(self, messages: Sequence[Mapping[str, Any]]) -> list[OutboxRow]:
        now = time.time()
        rows: list[OutboxRow] = []
        for message in messages:
            sinks = [s for s, only_ng in self._only_ng.items() if not only_ng or message.get("verdict") == "NG"]
            if not sinks:
                continue
            # One id per message, the same for every sink: the receiver's de-duplication key.
            message_id, payload = uuid.uuid4().hex, json.dumps(message, separators=(",", ":"), ensure_ascii=False)
            rows.extend(OutboxRow(sink, message_id, now, payload) for sink in sinks)
        return rows

    def _wake(self, sinks: set[str]) -> None:
        for sink in sinks:
            sender = self._senders.get(sink)
            if sender is not None:
                sender.wake()

    async def close(self, timeout_s: float) -> None:
        """Write what was published, give the senders up to ``timeout_s`` (from the call) to deliver what waits,
        then stop the threads. Undelivered messages stay in the outbox for the next start (logged)."""
        if self._state != "started":
            self._state = "closed"
            return
        self._state = "closing"
        if not self.enabled:
            self._state = "closed"
            return
        deadline = time.monotonic() + timeout_s
        if not await asyncio.to_thread(self._writer.flush, max(timeout_s, 1.0)):
            logger.warning("signals: the outbox writer did not finish within %.1f s", max(timeout_s, 1.0))
        while any(self.pending(s) for s in self.sinks) and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
        await asyncio.to_thread(self._stop_threads)
        self._state = "closed"
        left = {s: self.pending(s) for s in self.sinks if self.pending(s)}
        if left:
            logger.warning(
                "signals: %s left in %s for the next start",
                ", ".join(f"{n} {s} message(s)" for s, n in left.items()),
                self.path,
            )
        else:
            logger.info("signals: every message delivered")

    def _stop_threads(self) -> None:
        for sender in self._senders.values():
            sender.stop(5.0)
        self._writer.stop(5.0)
