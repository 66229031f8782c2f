"""Process resources under load: freed memory given back to the operating system after a burst (issue 12: RSS back
within 5 s after load stops), and the worker threads' CPU priority below the event loop's.

glibc keeps freed heap pages (per-thread arenas of the decode and inference threads, request bodies, decoded frames)
for reuse, so after a burst of hundreds of concurrent requests the process stays tens of MB larger than before it;
``malloc_trim(0)`` returns them. Called by the service when it has been idle for a moment, off the event loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import threading
from collections.abc import Callable

__all__ = ["lower_thread_priority", "release_free_memory"]

logger = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_free_memory() -> bool:
    """Return freed heap memory to the OS; False where the C library has no ``malloc_trim``."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


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
