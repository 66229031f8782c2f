"""What the two central sink threads share (the records :class:`~service.records.central.forwarder.Forwarder` and
the NG-image :class:`~service.records.central.images.ImageForwarder`): one pass under a lock, at once again after a
full pass, else a poll; after a failure the service's one backoff with the gauges refreshed while it waits; the
central connection closed without raising; start once, stop then close."""

from __future__ import annotations

import logging
import random
import threading
import time
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import psycopg

from service.records.central.journal import Journal
from service.records.central.settings import CentralSettings, scrub
from service.signals.sink import BASE_BACKOFF_S, SinkThread, backoff_s

__all__ = ["CentralThread", "PassError", "pause_refreshing", "retry_backoff_s"]

logger = logging.getLogger(__name__)


class PassError(Exception):
    """One pass of a central thread failed; ``reason`` labels its failure metric, the message has no secrets."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def retry_backoff_s(failures: int, min_s: float, max_s: float, rng: random.Random) -> float:
    """Seconds to wait after ``failures`` (>= 1) consecutive failed attempts: the service's one backoff
    (:func:`service.signals.sink.backoff_s`: doubling from ``BASE_BACKOFF_S``, equal jitter, capped at ``max_s``),
    entered at the first doubling whose delay reaches ``min_s`` (so a ``min_s`` above the base does not spend its first
    attempts below it), and kept within ``[min_s, max_s]``."""
    skip = 0
    while BASE_BACKOFF_S * 2.0**skip < min_s and skip < 30:
        skip += 1
    return min(max_s, max(min_s, backoff_s(max(failures, 1) - 1 + skip, max_s, rng)))


def pause_refreshing(sink: SinkThread, seconds: float, every_s: float, refresh: Callable[[], None]) -> bool:
    """``sink.pause(seconds)`` in slices of ``every_s``, calling ``refresh`` after each (an outage shows as growing
    gauges, not frozen ones); True when the sink is stopping."""
    deadline = time.monotonic() + seconds
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if sink.pause(min(remaining, every_s)):
            return True
        refresh()


class CentralThread(SinkThread):
    """A sink thread talking to the central store for one station. A subclass sets :attr:`error_type` (what its
    pass raises for an expected failure) and :attr:`log_prefix`, and implements :meth:`run_pass` (one pass under
    :attr:`_lock`; returns how much it did), :meth:`full` and :meth:`refresh_gauges` (called while backing off)."""

    error_type: ClassVar[type[Exception]]
    log_prefix: ClassVar[str]

    def __init__(
        self, name: str, label: str, settings: CentralSettings, data_dir: Path, rng: random.Random | None
    ) -> None:
        super().__init__(name, label)
        self.settings = settings
        self.data_dir = data_dir
        self._dsn = settings.dsn.get_secret_value()
        self._journal = Journal(data_dir, settings.station_id, settings.line_id)
        self._rng = rng or random.Random()
        self._lock = threading.Lock()  # one pass at a time: the thread's, or a direct call of run_pass
        self._conn: psycopg.Connection[Any] | None = None
        self._failures = 0  # consecutive
        self._last_error: dict[str, Any] | None = None

    @abstractmethod
    def run_pass(self) -> int:
        """One pass (forward a batch, settle images); how many it did."""

    @abstractmethod
    def full(self, done: int) -> bool:
        """Whether a pass that did ``done`` was full (more may wait: go on at once)."""

    @abstractmethod
    def refresh_gauges(self) -> None:
        """Refresh the gauges while backing off (takes :attr:`_lock` itself)."""

    def start(self) -> None:
        """Start the background thread (a no-op while it runs; once only: a stopped one is not restarted)."""
        if not self.alive:
            super().start()

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop the thread after the work in flight and close the connections; True when it ended within
        ``timeout_s``. What was not done stays for the next start."""
        if not super().stop(timeout_s):
            logger.error("%s: %s still busy after %.1f s at stop", self.log_prefix, self.label, timeout_s)
            return False
        self.close()  # the thread closed its own; this closes a direct pass's (the thread never ran)
        return True

    def step(self) -> float | None:
        """One pass; at once again after a full one, else wait ``poll_interval_s`` for :meth:`wake`. After a failure,
        back off (:func:`retry_backoff_s`), refreshing the gauges every ``poll_interval_s``."""
        if self.stopping:
            return None
        try:
            done = self.run_pass()
        except self.error_type:
            self._back_off()
            return 0.0
        except Exception as exc:  # a bug: say so without the DSN (the base would log a traceback), keep the thread
            logger.error("%s: unexpected %s error: %s", self.log_prefix, self.label, scrub(repr(exc), self._dsn))
            self._failures += 1
            self._back_off()
            return 0.0
        return 0.0 if self.full(done) else self.settings.poll_interval_s

    def close(self) -> None:
        """Close the central connection and the journal (on the thread after its last step, and at :meth:`stop`)."""
        with self._lock:
            self._close_conn()
            self._journal.close()

    def _back_off(self) -> None:
        s = self.settings
        delay = retry_backoff_s(self._failures, s.min_backoff_s, s.max_backoff_s, self._rng)
        pause_refreshing(self, delay, s.poll_interval_s, self.refresh_gauges)

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception as exc:  # closing a broken connection: nothing left to lose
                logger.debug("%s: closing the connection failed (%s)", self.log_prefix, type(exc).__name__)
