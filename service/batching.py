"""Dynamic batcher: groups single images from concurrent requests into batches for the backend.

A batch closes when it holds ``max_batch_size`` images or ``max_delay_ms`` after its oldest image arrived (0: take what
is queued now). The queue is bounded (full -> :class:`Overloaded`, 503), every image carries its request's deadline
(expired images are dropped before inference, their callers get 504), and a backend failure fails only that batch.
Inference runs on one dedicated thread, so the event loop never blocks and the backend sees one call at a time.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from service.backends.base import InferenceBackend
from service.errors import BackendFailure, DeadlineExceeded, NotReady, Overloaded
from service.metrics import ServiceMetrics

__all__ = ["BatchResult", "DynamicBatcher"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchResult:
    """Raw output of one image and how it got there."""

    output: npt.NDArray[np.float32]  # (4+nc, A)
    queue_s: float  # enqueue -> batch start
    inference_s: float  # the whole batch's backend call
    batch_size: int  # real images in the batch (padding excluded)
    batch_id: int


@dataclass
class _Item:
    x: npt.NDArray[np.float32]  # (3, H, W)
    enqueued: float  # monotonic seconds
    deadline: float  # monotonic seconds
    future: asyncio.Future[BatchResult] = field(repr=False)


class DynamicBatcher:
    """Owns the queue, the batching task and the inference thread. Create inside a running event loop's lifespan:
    ``await start()``, ``await submit_many(...)``, ``await stop()``."""

    def __init__(
        self,
        backend: InferenceBackend,
        *,
        max_batch_size: int,
        max_delay_ms: float,
        queue_size: int,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        served = [b for b in backend.batch_sizes if b <= max_batch_size] or [min(backend.batch_sizes)]
        self.backend = backend
        self.max_batch_size = max(served)
        self.max_delay_s = max_delay_ms / 1000.0
        self.queue_size = queue_size
        self.metrics = metrics
        self._served = sorted(backend.batch_sizes)
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=queue_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aoi-infer")
        self._task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self.batch_sizes_seen: deque[int] = deque(maxlen=1000)  # last batches formed, for tests and debugging

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="aoi-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(NotReady("service is shutting down"))
        self._executor.shutdown(wait=True)

    async def submit_many(self, inputs: Sequence[npt.NDArray[np.float32]], deadline: float) -> list[BatchResult]:
        """Queue images (``(3, H, W)`` float32 each) and wait for their outputs.

        Args:
            deadline: ``time.monotonic()`` instant after which the caller gets :class:`DeadlineExceeded`.

        Raises:
            Overloaded: the queue has no room for all images (nothing is queued then).
            DeadlineExceeded, BackendFailure, NotReady.
        """
        if not self.running:
            raise NotReady("the batcher is not running")
        if self._queue.qsize() + len(inputs) > self.queue_size:
            raise Overloaded(f"queue full ({self._queue.qsize()}/{self.queue_size} images waiting); retry shortly")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        items = [_Item(x, now, deadline, loop.create_future()) for x in inputs]
        for item in items:
            self._queue.put_nowait(item)
        self._set_depth()
        try:
            _, pending = await asyncio.wait([it.future for it in items], timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.CancelledError:  # client went away: let the batcher skip what has not run yet
            for it in items:
                it.future.cancel()
            raise
        if pending:
            for fut in pending:
                fut.cancel()
            raise DeadlineExceeded(
                f"deadline passed after {(time.monotonic() - now) * 1e3:.0f} ms waiting for inference"
            )
        errors = [it.future.exception() for it in items]  # retrieve every exception, not only the first
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return [it.future.result() for it in items]

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._queue.qsize())

    async def _collect(self) -> list[_Item]:
        first = await self._queue.get()
        batch = [first]
        close_at = first.enqueued + self.max_delay_s
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = close_at - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        self._set_depth()
        return batch

    def _live(self, batch: list[_Item]) -> list[_Item]:
        now = time.monotonic()
        live = []
        for item in batch:
            if item.future.done():  # the caller gave up (deadline or disconnect)
                continue
            if item.deadline <= now:
                item.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                continue
            live.append(item)
        return live

    def _pad_to(self, n: int) -> int:
        return next((b for b in self._served if b >= n), n)

    def _infer(self, xs: list[npt.NDArray[np.float32]]) -> tuple[npt.NDArray[np.float32], float]:
        n, size = len(xs), self._pad_to(len(xs))
        batch = np.empty((size, *xs[0].shape), np.float32)
        for i, x in enumerate(xs):
            batch[i] = x
        batch[n:] = batch[n - 1]  # padding rows repeat a real image, so they cannot produce NaNs
        t0 = time.perf_counter()
        out = self.backend.infer(batch)
        elapsed = time.perf_counter() - t0
        if out.shape[0] != size:
            raise RuntimeError(f"backend returned {out.shape[0]} outputs for a batch of {size}")
        return out[:n], elapsed

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._live(await self._collect())
            if not batch:
                continue
            batch_id = next(self._ids)
            start = time.monotonic()
            self.batch_sizes_seen.append(len(batch))
            try:
                out, infer_s = await loop.run_in_executor(self._executor, self._infer, [it.x for it in batch])
            except Exception as exc:
                logger.exception("backend failed on batch %d (%d images)", batch_id, len(batch))
                err = BackendFailure(f"inference failed for batch {batch_id}: {type(exc).__name__}: {exc}")
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(err)
                continue
            if self.metrics is not None:
                self.metrics.batch_size.observe(len(batch))
                self.metrics.stage_duration.labels(stage="inference").observe(infer_s)
            for i, it in enumerate(batch):
                if self.metrics is not None:
                    self.metrics.stage_duration.labels(stage="queue").observe(start - it.enqueued)
                if not it.future.done():
                    it.future.set_result(BatchResult(out[i], start - it.enqueued, infer_s, len(batch), batch_id))
