"""The one base of the service's background sinks: a thread that drains work to a disk or a receiver, survives its own
bugs, backs off while the sink fails, and stops (draining what it must) within a bound. Used by the records writer
(:mod:`service.records.store`), the signal outbox writer and the webhook and MQTT senders.

:class:`GroupQueue` is the writers' side: items handed over by the event loop, taken by the thread in groups (one
commit, one fsync for many), with a bound on what may wait in memory.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["BASE_BACKOFF_S", "GroupQueue", "SinkThread", "backoff_s"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
BASE_BACKOFF_S = 0.2  # first retry wait; doubles per failed attempt up to the sink's maximum
_BUG_PAUSE_S = 1.0  # after an unexpected error in a step: the sink is retried, not spun on


def backoff_s(attempt: int, max_s: float, rng: random.Random) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): exponential, capped at ``max_s``, "equal jitter"
    (AWS Architecture Blog, "Exponential Backoff And Jitter"): half the capped delay plus a random share of the other
    half, so several services retrying one receiver spread out while no wait collapses to zero."""
    delay = min(max_s, BASE_BACKOFF_S * 2.0 ** min(attempt, 30))
    return delay / 2 + rng.uniform(0.0, delay / 2)


class SinkThread(ABC):
    """One daemon thread running :meth:`step` until stopped.

    A subclass implements :meth:`step` (one pass: take or read work, write or send it) and may override :meth:`open`
    and :meth:`close` (run on the thread, around the loop: connections belong to the thread that uses them). An
    exception out of a step is logged with its traceback and the step is retried after a pause: the thread never
    dies silently while its backlog grows.
    """

    def __init__(self, name: str, label: str) -> None:
        """``name``: the thread's name (seen in py-spy, logs); ``label``: how log lines name the sink."""
        self.label = label
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    # --- the owner's side ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """New work is there (rows committed, a message acknowledged): end the current idle wait."""
        self._wake.set()

    def stop(self, timeout_s: float) -> bool:
        """Ask the thread to end after its current step (a writer drains its queue first: :meth:`step` returns
        False once it has) and wait at most ``timeout_s``; True when it has ended."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # --- the thread's side -----------------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def pause(self, seconds: float) -> bool:
        """Wait ``seconds`` (a backoff), cut short by :meth:`stop`; True when stopping."""
        return self._stopping.wait(seconds)

    def open(self) -> None:
        """Run on the thread before the first step (open its connections)."""
        return None

    def close(self) -> None:
        """Run on the thread after the last step, even after a failure of :meth:`open` or a step."""
        return None

    @abstractmethod
    def step(self) -> float | None:
        """One pass of work. Returns how long to wait for :meth:`wake` before the next pass (0: go on at once), or
        None when the thread should end (asked to stop, and nothing left that it must drain)."""

    def _main(self) -> None:
        try:
            self.open()
            while True:
                self._wake.clear()
                try:
                    idle = self.step()
                except Exception:  # a bug or an unexpected sink error: say so, keep the thread
                    logger.error("%s: failed; retrying in %.0f s", self.label, _BUG_PAUSE_S, exc_info=True)
                    self.pause(_BUG_PAUSE_S)
                    continue
                if idle is None:
                    return
                if idle > 0 and not self._stopping.is_set():
                    self._wake.wait(idle)
        finally:
            self.close()


class GroupQueue(Generic[_T]):
    """Items waiting for a writer thread, taken in groups.

    :meth:`put` refuses items past ``limit`` pending (queued plus taken and not yet marked :meth:`done`), so a slow
    disk cannot eat the memory. :meth:`take` blocks until a group is due: at once when an urgent item is queued (a
    durable request waits for it), else when the oldest queued item is ``window_s`` old (one commit then covers what
    came meanwhile), or when the queue is closed (everything left is taken). ``hold`` (called under the lock with
    each taken group) lets the owner mark the items as taken, atomically with their leaving the queue.
    """

    def __init__(self, limit: int, hold: Callable[[list[_T]], list[_T]] | None = None) -> None:
        self.limit = limit
        self._hold = hold
        self._cond = threading.Condition()
        self._items: list[tuple[float, _T]] = []  # (monotonic time queued, item)
        self._urgent = False
        self._pending = 0
        self._closed = False

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def queued(self) -> int:
        """Items waiting to be taken (pending ones the writer holds are not counted)."""
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, items: Sequence[_T], *, urgent: bool, count: int | None = None) -> bool:
        """Queue ``items``, which count as ``count`` pending (default: one each; a writer that queues batches counts
        their rows); False (nothing queued) when closed or ``limit`` would be passed."""
        n = len(items) if count is None else count
        with self._cond:
            if self._closed or self._pending + n > self.limit:
                return False
            now = time.monotonic()
            self._items.extend((now, item) for item in items)
            self._pending += n
            self._urgent = self._urgent or urgent
            self._cond.notify()
        return True

    def forget(self, drop: Callable[[_T], bool]) -> list[_T]:
        """Remove the queued items ``drop`` selects (their waiters gave up); they stop counting as pending."""
        with self._cond:
            gone = [item for _, item in self._items if drop(item)]
            if gone:
                self._items = [(t, item) for t, item in self._items if not drop(item)]
                self._pending -= len(gone)
            return gone

    def done(self, n: int) -> None:
        """``n`` taken items are written (or lost): they stop counting as pending."""
        with self._cond:
            self._pending -= n

    def close(self) -> None:
        """Refuse new items; :meth:`take` hands out what is left, then returns ``([], True)``."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take(self, window_s: float, until: float | None = None) -> tuple[list[_T], bool]:
        """Block until a group is due (see the class), or ``until`` (a monotonic time: the owner has other work
        then) passes; return (group, finished) where finished means closed and empty."""
        with self._cond:
            while True:
                now = time.monotonic()
                if self._items and (self._urgent or self._closed or now >= self._items[0][0] + window_s):
                    group = [item for _, item in self._items]
                    self._items.clear()
                    self._urgent = False
                    return (self._hold(group) if self._hold is not None else group), False
                if not self._items and self._closed:
                    return [], True
                if until is not None and now >= until:
                    return [], False
                due = self._items[0][0] + window_s if self._items else None
                deadlines = [d for d in (due, until) if d is not None]
                self._cond.wait(max(min(deadlines) - now, 0.0) if deadlines else None)
