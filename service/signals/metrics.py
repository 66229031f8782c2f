"""Prometheus collectors of the verdict signals (webhook, MQTT), and the one place a dropped signal is counted and
logged.

Kept apart from :mod:`service.inference.metrics` because the outbox writer and the sink threads record into them; names
and labels are part of the metrics contract all the same (docs/signals.md lists them).
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["DELIVERY_BUCKETS", "DROP_REASONS", "SINKS", "SignalMetrics"]

logger = logging.getLogger(__name__)

SINKS = ("webhook", "mqtt")
DROP_REASONS = ("outbox_full", "rejected", "backlog_full", "write_failed", "closed")
# Enqueue -> acknowledged, in seconds: milliseconds when the receiver is up, up to hours after an outage.
DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_LOG_EVERY_S = 10.0  # drops come in floods (a full outbox drops one per verdict): one line per sink and reason


class SignalMetrics:
    """The signal collectors on ``registry`` (a fresh one by default). Thread-safe: every method may be called from
    the outbox writer, the sender threads or the event loop."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.sent_total = Counter("aoi_signals_sent", "Verdict messages acknowledged by a sink", ["sink"], registry=r)
        self.failed_total = Counter(
            "aoi_signals_failed", "Failed delivery attempts (each retry counts)", ["sink"], registry=r
        )
        self.dropped_total = Counter(
            "aoi_signals_dropped", "Verdict messages given up on, by reason", ["sink", "reason"], registry=r
        )
        self.pending_gauge = Gauge(
            "aoi_signals_pending", "Verdict messages waiting in the outbox", ["sink"], registry=r
        )
        self.delivery_seconds = Histogram(
            "aoi_signal_delivery_seconds",
            "Enqueue to acknowledged, per message",
            ["sink"],
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self._lock = threading.Lock()
        self._unlogged: dict[tuple[str, str], int] = {}
        self._logged_at: dict[tuple[str, str], float] = {}

    def init_sink(self, sink: str) -> None:
        """Create the sink's series at zero, so dashboards see them before the first event."""
        self.sent_total.labels(sink=sink)
        self.failed_total.labels(sink=sink)
        self.pending_gauge.labels(sink=sink)
        self.delivery_seconds.labels(sink=sink)
        for reason in DROP_REASONS:
            self.dropped_total.labels(sink=sink, reason=reason)

    def sent(self, sink: str, enqueued_at: float) -> None:
        """One message was acknowledged; ``enqueued_at`` is its unix time of publishing."""
        self.sent_total.labels(sink=sink).inc()
        self.delivery_seconds.labels(sink=sink).observe(max(0.0, time.time() - enqueued_at))

    def failed(self, sink: str) -> None:
        """One delivery attempt failed."""
        self.failed_total.labels(sink=sink).inc()

    def pending(self, sink: str, n: int) -> None:
        """``n`` messages now wait for ``sink``."""
        self.pending_gauge.labels(sink=sink).set(n)

    def dropped(self, sink: str, reason: str, n: int = 1) -> None:
        """``n`` messages for ``sink`` were given up on: counted, and logged at most every few seconds."""
        if n <= 0:
            return
        self.dropped_total.labels(sink=sink, reason=reason).inc(n)
        key = (sink, reason)
        now = time.monotonic()
        with self._lock:
            total = self._unlogged.get(key, 0) + n
            if now - self._logged_at.get(key, -_LOG_EVERY_S) < _LOG_EVERY_S:
                self._unlogged[key] = total
                return
            self._unlogged[key] = 0
            self._logged_at[key] = now
        logger.warning("signals: dropped %d %s message(s) (%s)", total, sink, reason)
