"""Process memory over the service's life: freed memory given back to the operating system after a burst (RSS back
within 5 s after load stops), and the startup heap kept out of the garbage collector's full passes.

glibc keeps freed heap pages (per-thread arenas of the decode and inference threads, request bodies, decoded frames)
for reuse, so after a burst of hundreds of concurrent requests the process stays tens of MB larger than before it;
``malloc_trim(0)`` returns them. Called by the service when it has been idle for a moment, off the event loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import gc
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Protocol

__all__ = ["GcPauses", "freeze_heap", "refreeze_heap", "release_free_memory", "trim_when_idle"]

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


class _Idle(Protocol):
    @property
    def idle(self) -> bool: ...

    @property
    def admitted_inputs(self) -> int: ...


async def trim_when_idle(service: _Idle, pool: Executor, every_s: float = 1.0) -> None:
    """Every ``every_s``: when ``service`` is idle and has admitted work since the last time, hand the memory freed
    since back to the OS (:func:`release_free_memory`, on ``pool``), so RSS returns to its level before a burst."""
    seen = 0
    while True:
        await asyncio.sleep(every_s)
        admitted = service.admitted_inputs
        if admitted != seen and service.idle:
            seen = admitted
            await asyncio.get_running_loop().run_in_executor(pool, release_free_memory)


def freeze_heap() -> None:
    """Collect once, then move every object alive now (libraries, the bundle, the backend, the app: about 100,000
    on the default bundle) out of the cyclic garbage collector's view (:func:`gc.freeze`).

    A full collection otherwise walks that whole heap while holding the GIL, stopping every Python thread for tens of
    milliseconds at saturation: the worst tail of the answers. After the freeze the same collections walk only what
    requests created (docs/measurements.md, M5). Called once the service is warm.
    """
    gc.collect()
    gc.freeze()
    logger.info("startup heap frozen: %d objects kept out of the garbage collector's passes", gc.get_freeze_count())


def refreeze_heap() -> None:
    """After a model was retired (a live swap): let the collector see the frozen heap again, collect what the
    retired model left in reference cycles, and freeze the survivors (the new model among them). One full
    collection, a pause once per swap (docs/measurements.md, M5). Nothing to do where the heap was
    never frozen."""
    if gc.get_freeze_count() == 0:
        return
    gc.unfreeze()
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    logger.info("heap refrozen after retiring a model: %d objects, collected in %.0f ms", gc.get_freeze_count(),
                (time.perf_counter() - t0) * 1e3)  # fmt: skip


class GcPauses:
    """How long each pass of the garbage collector stopped the process, by generation (it holds the GIL throughout,
    so every Python thread, the event loop first, waits for it).

    ``start()`` hooks ``gc.callbacks``; the hook only appends ``(generation, seconds)`` to a bounded deque, because a
    collection can start inside any allocation, with any lock held (a metrics lock included); :meth:`drain` hands
    the pauses to whoever records them, off the hook. ``stop()`` unhooks.
    """

    def __init__(self, maxlen: int = 100_000) -> None:
        self._pending: deque[tuple[int, float]] = deque(maxlen=maxlen)
        self._t0 = 0.0

    def _hook(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()  # passes never overlap: the collector holds the GIL
        else:
            self._pending.append((int(info["generation"]), time.perf_counter() - self._t0))

    def start(self) -> None:
        if self._hook not in gc.callbacks:
            gc.callbacks.append(self._hook)

    def stop(self) -> None:
        if self._hook in gc.callbacks:
            gc.callbacks.remove(self._hook)

    def drain(self) -> list[tuple[int, float]]:
        """The pauses since the last call, oldest first."""
        out = []
        while self._pending:
            out.append(self._pending.popleft())
        return out
