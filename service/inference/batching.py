"""Dynamic batcher: groups single images from concurrent requests into batches for the backend.

A batch closes when it holds ``max_batch_size`` images or ``max_delay_ms`` after its oldest image arrived (0: take what
is queued now). The queue serves requests round-robin (:class:`FairQueue`) and is bounded (full ->
:class:`Overloaded`, 503), every image carries its request's deadline (expired images are dropped before inference,
their callers get 504), and a backend failure fails only that batch. Inference runs on ``instances`` dedicated
threads (Triton's model instances), so the event loop never blocks: a new batch is collected only when an instance is
free, so while all are busy the queue grows into the next, fuller batch; a backlog is split between the instances
(each batch takes at most its share) so that none idles while another runs everything that was waiting.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from service.backends import CPU_KINDS
from service.core.backend import InferenceBackend
from service.core.errors import BackendFailure, DeadlineExceeded, NotReady, Overloaded, PostprocessFailure
from service.inference.metrics import StageObserver
from service.inference.threads import lower_thread_priority

__all__ = ["BatchResult", "DrainRate", "DynamicBatcher", "FairQueue", "resolve_max_delay_ms"]

logger = logging.getLogger(__name__)


def resolve_max_delay_ms(setting: float | str, backend_kind: str) -> float:
    """The ``max_delay_ms`` setting for a backend: a number as given; ``auto`` is 0 on the CPU backends (ONNX Runtime
    CPU, OpenVINO) and 2 ms on the GPU ones. On a CPU a batch of n costs nearly n single images, so a partial batch
    waiting for more only adds latency; a GPU runs a batch in about the time of one image, so waiting briefly raises
    its throughput (docs/measurements.md, M1)."""
    if setting == "auto":
        return 0.0 if backend_kind in CPU_KINDS else 2.0
    return float(setting)


@dataclass(frozen=True)
class BatchResult:
    """Raw output of one image and how it got there."""

    output: npt.NDArray[np.float32]  # (4+nc, A)
    queue_s: float  # enqueue -> batch start
    inference_s: float  # the whole batch's backend call
    batch_size: int  # real images in the batch (padding excluded)
    batch_id: int
    finished: Any = None  # what ``finish`` made of this image's output (None without ``finish``)
    finish_s: float = 0.0  # ``finish`` over the whole batch


Assemble = Callable[[Sequence[Any], npt.NDArray[Any]], None]
"""``assemble(inputs, batch)`` writes the model inputs into ``batch[:len(inputs)]`` (``(size, *input_shape)`` of
``input_dtype``: ``(3, H, W)`` float32, or ``(H, W, 3)`` uint8 for a graph that normalises its own input) on
the inference thread, so a tile goes from the decoded frame straight into the batch buffer. The default copies
``(3, H, W)`` float32 arrays."""

Finish = Callable[[npt.NDArray[np.float32], Sequence[Any]], Sequence[Any]]
"""``finish(outputs (n, 4+nc, A), contexts) -> one result per image``, run on the inference thread right after the
backend call (post-processing without another thread hop)."""


class _FinishError(Exception):
    """Carries an exception ``assemble`` or ``finish`` raised (``__cause__``), so it is not reported as a backend
    failure; ``args[0]`` names the step."""


def _copy_rows(inputs: Sequence[Any], batch: npt.NDArray[Any]) -> None:
    for i, x in enumerate(inputs):
        batch[i] = x


@dataclass
class _Item:
    x: Any  # one model input: (3, H, W) float32, or whatever ``assemble`` turns into a batch row
    enqueued: float  # monotonic seconds
    deadline: float  # monotonic seconds
    future: asyncio.Future[BatchResult] = field(repr=False)
    context: Any = None  # passed to ``finish``
    ahead: int = 0  # inputs to be served before it when it was queued (the drain-rate sample; 0: none taken)


class FairQueue:
    """The model inputs waiting for a batch, one FIFO per request, served round-robin: a batch takes one input of
    each waiting request in turn, so a request of hundreds of tiles (or a multipart of 32 images) does not hold every
    single-image request behind all of its inputs; within a request, inputs keep their order. Used on the event loop
    only."""

    def __init__(self) -> None:
        self._flows: OrderedDict[int, deque[_Item]] = OrderedDict()
        self._ids = itertools.count()
        self._size = 0
        self._ready = asyncio.Event()

    def qsize(self) -> int:
        return self._size

    def empty(self) -> bool:
        return self._size == 0

    @property
    def requests(self) -> int:
        """Requests with inputs waiting."""
        return len(self._flows)

    def ahead_of(self, need: int) -> int:
        """Inputs served before the last of ``need`` inputs of a request queued now: at most ``need`` of each
        waiting request (round-robin)."""
        return sum(min(len(flow), need) for flow in self._flows.values())

    def put_request(self, items: Sequence[_Item]) -> None:
        if items:
            self._flows[next(self._ids)] = deque(items)
            self._size += len(items)
            self._ready.set()

    def get_nowait(self) -> _Item:
        if not self._flows:
            raise asyncio.QueueEmpty
        key, flow = next(iter(self._flows.items()))
        item = flow.popleft()
        if flow:
            self._flows.move_to_end(key)  # its next input waits for one of every other request
        else:
            del self._flows[key]
        self._size -= 1
        return item

    async def get(self) -> _Item:
        while not self._size:
            self._ready.clear()
            await self._ready.wait()
        return self.get_nowait()


class DrainRate:
    """The rate the queue drains at (model inputs started per second), measured the way a new request will live it:
    an input that had ``ahead`` inputs queued before it and waited ``wait`` seconds for its batch to start saw
    ``ahead / wait``. The median of the recent samples (the last ``samples``, none older than ``max_age_s``), so it
    includes every overhead of the running service (the event loop, the GIL, other load on the machine), unlike a
    rate computed from inference times. Used on the event loop only."""

    def __init__(self, samples: int = 64, max_age_s: float = 5.0, recompute_s: float = 0.05) -> None:
        self.max_age_s = max_age_s
        self.recompute_s = recompute_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=samples)
        self._cached: tuple[float, float | None] | None = None  # (when, rate): asked on every request at the door

    def add(self, ahead: int, wait_s: float, now: float) -> None:
        if ahead > 0 and wait_s > 0:
            self._samples.append((now, ahead / wait_s))
            self._cached = None

    def rate(self, now: float) -> float | None:
        """Inputs per second, or None when nothing queued has been measured lately (the queue was short)."""
        if self._cached is not None and 0 <= now - self._cached[0] < self.recompute_s:
            return self._cached[1]
        fresh = sorted(r for t, r in self._samples if now - t <= self.max_age_s)
        rate = fresh[len(fresh) // 2] if len(fresh) >= 4 else None
        self._cached = (now, rate)
        return rate


class DynamicBatcher:
    """Owns the queue, the batching task and the inference thread. Create inside a running event loop's lifespan:
    ``await start()``, ``await submit_many(...)``, ``await stop()``. ``metrics`` hears of the queue depth and of every
    batch run (without one, nothing is recorded)."""

    def __init__(
        self,
        backend: InferenceBackend,
        *,
        max_batch_size: int,
        max_delay_ms: float,
        queue_size: int,
        instances: int = 1,
        finish: Finish | None = None,
        assemble: Assemble | None = None,
        input_shape: tuple[int, ...] | None = None,
        input_dtype: type[np.generic] = np.float32,
        metrics: StageObserver | None = None,
        thread_niceness: int = 0,
    ) -> None:
        if instances < 1:
            raise ValueError(f"instances must be >= 1, got {instances}")
        served = [b for b in backend.batch_sizes if b <= max_batch_size] or [min(backend.batch_sizes)]
        self.backend = backend
        self.max_batch_size = max(served)
        self.max_delay_s = max_delay_ms / 1000.0
        self.queue_size = queue_size
        self.metrics = metrics if metrics is not None else StageObserver()  # the base records nothing
        self._served = sorted(backend.batch_sizes)
        self._queue = FairQueue()
        self.instances = instances
        self._finish = finish
        self._assemble = assemble or _copy_rows
        self._input_shape = input_shape  # (3, H, W); None: the shape of the first input (float32 arrays)
        self._input_dtype = np.dtype(input_dtype)  # float32, or uint8 for a graph that normalises its own input
        self._executor = ThreadPoolExecutor(
            max_workers=instances, thread_name_prefix="aoi-infer", initializer=lower_thread_priority(thread_niceness)
        )
        self._buffers = threading.local()  # one input buffer per inference thread, reused by every batch
        self.drain = DrainRate()
        self.batch_s = 0.0  # wall time of the last batch (assemble + backend + finish), for admission
        self._free = asyncio.Semaphore(instances)
        self._running: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self.batch_sizes_seen: deque[int] = deque(maxlen=1000)  # last batches formed, for tests and debugging

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch running."""
        return self._queue.empty() and not self._running

    def ahead_of(self, need: int) -> int:
        """Queued inputs that would be served before the last of ``need`` inputs queued now."""
        return self._queue.ahead_of(need)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="aoi-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._running:  # batches already in the backend finish and deliver (the threads cannot be interrupted)
            await asyncio.gather(*self._running, return_exceptions=True)
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(NotReady("service is shutting down"))
        self._executor.shutdown(wait=True)

    async def submit_many(
        self, inputs: Sequence[Any], deadline: float, contexts: Sequence[Any] | None = None
    ) -> list[BatchResult]:
        """Queue model inputs (``(3, H, W)`` float32 each, or what ``assemble`` takes) and wait for their outputs.
        All inputs of one call share its deadline (the tiles of a frame: one deadline per frame).

        Args:
            deadline: ``time.monotonic()`` instant after which the caller gets :class:`DeadlineExceeded`.
            contexts: one per image, handed to ``finish`` with the image's output.

        Raises:
            Overloaded: the queue has no room for all images (nothing is queued then).
            DeadlineExceeded, BackendFailure, NotReady.
        """
        if not self.running:
            raise NotReady("the batcher is not running")
        if self._queue.qsize() + len(inputs) > self.queue_size:
            raise Overloaded(
                f"queue full ({self._queue.qsize()}/{self.queue_size} model inputs waiting, this request needs "
                f"{len(inputs)}); retry shortly"
            )
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        ctxs = list(contexts) if contexts is not None else [None] * len(inputs)
        if len(ctxs) != len(inputs):
            raise ValueError(f"{len(inputs)} inputs but {len(ctxs)} contexts")
        # The drain-rate sample is the first input's: round-robin serves one input of each request queued before it.
        items = [
            _Item(x, now, deadline, loop.create_future(), c, self._queue.requests if i == 0 else 0)
            for i, (x, c) in enumerate(zip(inputs, ctxs, strict=True))
        ]
        self._queue.put_request(items)
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
        self.metrics.queued(self._queue.qsize())

    async def _collect(self) -> list[_Item]:
        first = await self._queue.get()
        batch = [first]
        close_at = first.enqueued + self.max_delay_s
        limit = self.max_batch_size
        backlog = 1 + self._queue.qsize()
        if self.instances > 1 and backlog > 1:
            # A backlog is shared between the instances: one instance taking all of it would leave the others idle
            # while every waiting caller waits on that one batch.
            limit = min(limit, -(-backlog // self.instances))
        while len(batch) < limit:
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

    def _infer(
        self, batch_items: list[_Item]
    ) -> tuple[npt.NDArray[np.float32], tuple[float, float], Sequence[Any], float]:
        """Assemble, run and finish one batch on an inference thread: (outputs, (wall, thread CPU) seconds of the
        backend call, finished results, finish seconds)."""
        xs = [it.x for it in batch_items]
        n, size = len(xs), self._pad_to(len(xs))
        shape = tuple(self._input_shape or xs[0].shape)
        # A buffer per thread at the largest size, reused: a fresh multi-MB array per batch left the allocator
        # holding tens of MB more after a burst (RSS that did not come back).
        buf: npt.NDArray[Any] | None = getattr(self._buffers, "batch", None)
        if buf is None or buf.shape[0] < size or buf.shape[1:] != shape or buf.dtype != self._input_dtype:
            buf = np.empty((max(size, self._served[-1]), *shape), self._input_dtype)
            self._buffers.batch = buf
        batch = buf[:size]
        try:
            self._assemble(xs, batch[:n])
        except Exception as exc:
            raise _FinishError("building the model input") from exc
        batch[n:] = batch[n - 1]  # padding rows repeat a real image, so they cannot produce NaNs
        t0, c0 = time.perf_counter(), time.thread_time()
        out = self.backend.infer(batch)
        elapsed = (time.perf_counter() - t0, time.thread_time() - c0)
        if out.shape[0] != size:
            raise RuntimeError(f"backend returned {out.shape[0]} outputs for a batch of {size}")
        out = out[:n]
        if self._finish is None:
            return out, elapsed, [None] * n, 0.0
        t1 = time.perf_counter()
        try:
            finished = self._finish(out, [it.context for it in batch_items])
            if len(finished) != n:
                raise RuntimeError(f"finish returned {len(finished)} results for {n} images")
        except Exception as exc:
            raise _FinishError("post-processing") from exc
        return out, elapsed, finished, time.perf_counter() - t1

    async def _run(self) -> None:
        while True:
            await self._free.acquire()  # collect the next batch only when an instance can run it
            try:
                batch = self._live(await self._collect())
            except BaseException:
                self._free.release()
                raise
            if not batch:
                self._free.release()
                continue
            task = asyncio.get_running_loop().create_task(self._execute(batch), name="aoi-batch")
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _execute(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        batch_id = next(self._ids)
        start = time.monotonic()
        self.batch_sizes_seen.append(len(batch))
        for it in batch:
            self.drain.add(it.ahead, start - it.enqueued, start)
        try:
            out, (infer_s, cpu_s), finished, finish_s = await loop.run_in_executor(self._executor, self._infer, batch)
        except Exception as exc:
            err: Exception
            if isinstance(exc, _FinishError):
                cause, step = exc.__cause__, exc.args[0]
                logger.error("%s failed on batch %d (%d inputs)", step, batch_id, len(batch), exc_info=cause)
                what = f"{type(cause).__name__}: {cause}"
                err = PostprocessFailure(f"{step} failed for batch {batch_id}: {what}")
            else:
                logger.exception("backend failed on batch %d (%d images)", batch_id, len(batch))
                err = BackendFailure(f"inference failed for batch {batch_id}: {type(exc).__name__}: {exc}")
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(err)
            return
        finally:
            self._free.release()
        self.batch_s = time.monotonic() - start
        self.metrics.batch_done(len(batch), infer_s, [start - it.enqueued for it in batch], cpu_s)
        for i, it in enumerate(batch):
            if not it.future.done():
                it.future.set_result(
                    BatchResult(out[i], start - it.enqueued, infer_s, len(batch), batch_id, finished[i], finish_s)
                )
