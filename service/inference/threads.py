"""The worker threads' CPU priority: the decode and inference threads run below the event loop, which admits,
refuses and answers every request."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

__all__ = ["lower_thread_priority"]

logger = logging.getLogger(__name__)


def lower_thread_priority(niceness: int) -> Callable[[], None]:
    """A thread-pool ``initializer`` that raises the calling thread's nice value by ``niceness`` (Linux: per
    thread), so the event loop, which admits, refuses and answers every request, is never starved by the decode and
    inference threads it feeds: under overload, refusals stay fast and answers go out as soon as they are computed,
    while the workers still get every cycle the event loop does not need. 0 leaves the priority alone."""

    def init() -> None:
        if niceness <= 0 or not hasattr(os, "setpriority"):
            return
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + niceness)
        except OSError as exc:  # not permitted in some sandboxes: run at the same priority
            logger.warning("could not lower the priority of thread %s: %s", threading.current_thread().name, exc)

    return init
