"""service/inference/batching.py without HTTP (batch formation, deadlines, overload, failure isolation) and through
HTTP."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest

from service.core.errors import BackendFailure, DeadlineExceeded, Overloaded, PostprocessFailure
from service.inference.batching import DynamicBatcher, FairQueue, resolve_max_delay_ms
from service.settings import Settings
from tests.service.conftest import FakeBackend, serve
from tests.synthetic import make_image_bytes

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _x(value: float, size: int = 64) -> np.ndarray:
    return np.full((3, size, size), value, np.float32)


async def _until(predicate: Any, timeout_s: float = 10.0) -> None:
    t_end = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < t_end, "condition not reached"
        await asyncio.sleep(0.01)


async def _now(value: bool) -> bool:
    return value


async def _with_batcher(backend: FakeBackend, finish: Any = None, **kw: float) -> DynamicBatcher:
    b = DynamicBatcher(
        backend,
        max_batch_size=int(kw.get("max_batch_size", 4)),
        max_delay_ms=kw.get("max_delay_ms", 50.0),
        queue_size=int(kw.get("queue_size", 16)),
        instances=int(kw.get("instances", 1)),
        finish=finish,
    )
    await b.start()
    return b


async def test_concurrent_requests_form_batches(bundle: object) -> None:
    backend = FakeBackend(bundle)  # type: ignore[arg-type]
    batcher = await _with_batcher(backend, max_batch_size=4, max_delay_ms=200)
    try:
        deadline = time.monotonic() + 5
        results = await asyncio.gather(*(batcher.submit_many([_x(i / 10)], deadline) for i in range(10)))
    finally:
        await batcher.stop()
    assert sorted(backend.calls) == [2, 4, 4]
    assert list(batcher.batch_sizes_seen) == [4, 4, 2]
    for i, (r,) in enumerate(results):  # each caller gets its own image's output back
        assert r.output.shape == (6, 64)
        np.testing.assert_allclose(r.output[4], i / 10, atol=1e-6)


async def test_partial_batch_waits_at_most_max_delay(bundle: object) -> None:
    backend = FakeBackend(bundle)  # type: ignore[arg-type]
    batcher = await _with_batcher(backend, max_batch_size=8, max_delay_ms=30)
    try:
        t0 = time.monotonic()
        (r,) = await batcher.submit_many([_x(0.5)], time.monotonic() + 5)
        waited = time.monotonic() - t0
    finally:
        await batcher.stop()
    assert r.batch_size == 1 and r.queue_s >= 0.025 and waited < 1.0


async def test_zero_delay_and_padding_to_served_size(bundle: object) -> None:
    backend = FakeBackend(bundle, max_batch=4)  # type: ignore[arg-type]
    backend.batch_sizes = (1, 4)  # like an engine that only serves 1 and 4
    batcher = await _with_batcher(backend, max_batch_size=4, max_delay_ms=0)
    try:
        backend.gate = threading.Event()
        started = backend.started
        first = asyncio.ensure_future(batcher.submit_many([_x(0.1)], time.monotonic() + 5))
        await _until(lambda: _now(backend.started == started + 1))  # the first batch (1 image) is blocked
        rest = asyncio.ensure_future(batcher.submit_many([_x(0.2), _x(0.3)], time.monotonic() + 5))
        await _until(lambda: _now(batcher.depth == 2))
        backend.gate.set()
        await first
        out = await rest
    finally:
        await batcher.stop()
    assert backend.calls == [1, 4]  # 2 queued images padded up to the served size 4
    assert [r.batch_size for r in out] == [2, 2]
    np.testing.assert_allclose(out[1].output[4], 0.3, atol=1e-6)


async def test_deadline_gives_deadline_exceeded(bundle: object) -> None:
    backend = FakeBackend(bundle, delay_s=0.3)  # type: ignore[arg-type]
    batcher = await _with_batcher(backend, max_delay_ms=0)
    try:
        with pytest.raises(DeadlineExceeded, match="deadline"):
            await batcher.submit_many([_x(0.1)], time.monotonic() + 0.05)
        # A queued image whose deadline passed before its batch started never reaches the backend.
        slow = asyncio.ensure_future(batcher.submit_many([_x(0.2)], time.monotonic() + 5))
        with pytest.raises(DeadlineExceeded):
            await batcher.submit_many([_x(0.3)], time.monotonic() + 0.1)
        await slow
    finally:
        await batcher.stop()
    assert len(backend.calls) <= 2


async def test_overload_rejects_without_queueing(bundle: object) -> None:
    backend = FakeBackend(bundle)  # type: ignore[arg-type]
    backend.gate = threading.Event()
    batcher = await _with_batcher(backend, max_batch_size=1, max_delay_ms=0, queue_size=2)
    try:
        running = asyncio.ensure_future(batcher.submit_many([_x(0.1)], time.monotonic() + 5))
        await _until(lambda: _now(backend.started == 1))
        queued = asyncio.ensure_future(batcher.submit_many([_x(0.2), _x(0.3)], time.monotonic() + 5))
        await _until(lambda: _now(batcher.depth == 2))
        with pytest.raises(Overloaded, match="queue full"):
            await batcher.submit_many([_x(0.4)], time.monotonic() + 5)
        assert batcher.depth == 2
        backend.gate.set()
        await running
        assert len(await queued) == 2
    finally:
        await batcher.stop()


async def test_failed_batch_fails_only_its_requests(bundle: object) -> None:
    backend = FakeBackend(bundle)  # type: ignore[arg-type]
    backend.fail_when = lambda x: bool(np.isclose(x[:, 0, 0, 0], 0.9).any())
    batcher = await _with_batcher(backend, max_batch_size=2, max_delay_ms=100)
    try:
        deadline = time.monotonic() + 5
        outcomes = await asyncio.gather(
            *(batcher.submit_many([_x(v)], deadline) for v in (0.9, 0.1, 0.2, 0.3)), return_exceptions=True
        )
    finally:
        await batcher.stop()
    assert isinstance(outcomes[0], BackendFailure) and isinstance(outcomes[1], BackendFailure)
    assert "simulated GPU fault" in outcomes[0].message and "batch" in outcomes[0].message
    assert all(isinstance(o, list) for o in outcomes[2:])


class _EnteredBackend(FakeBackend):
    """Says when a call has entered ``infer`` (and is then held by ``gate``)."""

    def __init__(self, bundle: Any) -> None:
        super().__init__(bundle)
        self.entered = threading.Event()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.entered.set()
        return super().infer(batch)


async def test_http_overload_503_with_retry_after_and_deadline_504(bundle: object) -> None:
    backend = _EnteredBackend(bundle)
    settings = Settings(max_batch_size=1, max_delay_ms=0, queue_size=1, deadline_ms=1500)
    async with serve(settings, bundle=bundle, backend=backend) as client:
        backend.gate = threading.Event()
        backend.entered.clear()  # warm-up at start-up already called infer
        img = make_image_bytes(16, 16, "png")
        post = lambda: client.post("/v1/inspect", content=img, headers={"content-type": "image/png"})  # noqa: E731

        async def queued(n: int) -> bool:
            return f"aoi_queue_depth {float(n)}" in (await client.get("/metrics")).text

        first = asyncio.ensure_future(post())  # blocks inside the backend
        await _until(lambda: asyncio.to_thread(backend.entered.wait, 0.05))
        second = asyncio.ensure_future(post())  # fills the queue
        await _until(lambda: queued(1))
        third = await post()
        assert third.status_code == 503 and third.headers["retry-after"] == "1"
        assert third.json()["code"] == "overloaded"
        r1, r2 = await asyncio.gather(first, second)
        backend.gate.set()
        assert {r1.status_code, r2.status_code} == {504}
        metrics = (await client.get("/metrics")).text
        assert "aoi_requests_timed_out_total 2.0" in metrics
        assert 'aoi_requests_rejected_total{reason="queue_full"} 1.0' in metrics


class _ConcurrencyProbe(FakeBackend):
    """Counts how many ``infer`` calls overlap; each call waits (up to 2 s) until ``expect`` calls are inside, so the
    peak does not depend on how fast threads start on a loaded machine."""

    def __init__(self, bundle: Any, expect: int) -> None:
        super().__init__(bundle, delay_s=0.05)
        self._cond = threading.Condition()
        self.expect = expect
        self.active = 0
        self.peak = 0

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with self._cond:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self.active >= self.expect, timeout=2)
        try:
            return super().infer(batch)
        finally:
            with self._cond:
                self.active -= 1


@pytest.mark.parametrize("instances", [1, 2, 3])
async def test_instances_run_that_many_batches_at_once(bundle: object, instances: int) -> None:
    backend = _ConcurrencyProbe(bundle, expect=instances)
    batcher = await _with_batcher(backend, max_batch_size=1, max_delay_ms=0, instances=instances)
    try:
        deadline = time.monotonic() + 5
        t0 = time.monotonic()
        results = await asyncio.gather(*(batcher.submit_many([_x(i / 10)], deadline) for i in range(6)))
        elapsed = time.monotonic() - t0
    finally:
        await batcher.stop()
    assert backend.peak == instances and sorted(backend.calls) == [1] * 6
    assert elapsed >= 0.05 * (6 // instances) * 0.9  # never more than `instances` batches at once
    for i, (r,) in enumerate(results):  # outputs still go back to their own callers
        np.testing.assert_allclose(r.output[4], i / 10, atol=1e-6)


async def test_busy_instances_let_the_queue_grow_and_share_the_backlog(bundle: object) -> None:
    backend = FakeBackend(bundle, max_batch=8)  # type: ignore[arg-type]
    backend.gate = threading.Event()
    batcher = await _with_batcher(backend, max_batch_size=8, max_delay_ms=0, instances=2)
    try:
        deadline = time.monotonic() + 5
        first = []
        for k in range(2):  # two single-image batches, one after the other, hold both instances
            first.append(asyncio.ensure_future(batcher.submit_many([_x(0.1)], deadline)))
            await _until(lambda k=k: _now(backend.started == k + 1))
        rest = [asyncio.ensure_future(batcher.submit_many([_x(0.2)], deadline)) for _ in range(5)]
        await _until(lambda: _now(batcher.depth == 5))
        backend.gate.set()
        await asyncio.gather(*first, *rest)
    finally:
        await batcher.stop()
    seen = list(batcher.batch_sizes_seen)
    # the backlog of 5 grew while both instances were busy; it is shared (at most ceil(backlog / instances) per
    # batch: 3 of 5, then 1 of 2, then 1 of 1), not run by one instance while the other idles
    assert seen[:3] == [1, 1, 3] and sorted(seen[3:]) == [1, 1]


async def test_finish_runs_per_batch_and_its_failure_fails_only_that_batch(bundle: object) -> None:
    seen: list[list[Any]] = []

    def finish(out: np.ndarray, contexts: Any) -> list[Any]:
        seen.append(list(contexts))
        if "bad" in contexts:
            raise ValueError("post-processing bug")
        return [(c, float(o[4].mean())) for c, o in zip(contexts, out, strict=True)]

    backend = FakeBackend(bundle)  # type: ignore[arg-type]
    batcher = await _with_batcher(backend, finish=finish, max_batch_size=2, max_delay_ms=100)
    try:
        deadline = time.monotonic() + 5
        a, b = await asyncio.gather(
            batcher.submit_many([_x(0.3)], deadline, ["a"]), batcher.submit_many([_x(0.6)], deadline, ["b"])
        )
        with pytest.raises(PostprocessFailure, match=r"post-processing failed for batch \d+: ValueError: post-proc"):
            await batcher.submit_many([_x(0.1)], deadline, ["bad"])
        (c,) = await batcher.submit_many([_x(0.9)], deadline, ["c"])
        with pytest.raises(ValueError, match="contexts"):
            await batcher.submit_many([_x(0.1)], deadline, ["x", "y"])
    finally:
        await batcher.stop()
    assert seen[0] == ["a", "b"] and a[0].finished[0] == "a" and b[0].finished == ("b", pytest.approx(0.6))
    assert a[0].finish_s >= 0 and c.finished == ("c", pytest.approx(0.9))


def test_max_delay_auto_depends_on_the_backend() -> None:
    assert resolve_max_delay_ms("auto", "onnxruntime-cpu") == 0.0 and resolve_max_delay_ms("auto", "openvino") == 0.0
    assert resolve_max_delay_ms("auto", "tensorrt") == 2.0 and resolve_max_delay_ms("auto", "onnxruntime-cuda") == 2.0
    assert resolve_max_delay_ms(7.5, "onnxruntime-cpu") == 7.5


def _item(tag: float) -> Any:
    from service.inference.batching import _Item

    return _Item(tag, 0.0, 1e9, asyncio.get_running_loop().create_future())


async def test_fair_queue_serves_requests_round_robin() -> None:
    q = FairQueue()
    q.put_request([_item(1.0 + i / 10) for i in range(4)])  # a big request: 1.0 .. 1.3
    q.put_request([_item(2.0)])
    q.put_request([_item(3.0), _item(3.1)])
    assert (q.qsize(), q.requests, q.ahead_of(1), q.ahead_of(2), q.ahead_of(9)) == (7, 3, 3, 5, 7)
    order = [q.get_nowait().x for _ in range(7)]
    assert order == [1.0, 2.0, 3.0, 1.1, 3.1, 1.2, 1.3]  # one of each in turn; each request in its own order
    assert q.empty() and q.requests == 0
    with pytest.raises(asyncio.QueueEmpty):
        q.get_nowait()


async def test_a_single_image_is_not_held_behind_a_many_tile_request(bundle: object) -> None:
    backend = FakeBackend(bundle)  # type: ignore[arg-type]
    batcher = await _with_batcher(backend, max_batch_size=1, max_delay_ms=0, queue_size=64)
    try:
        backend.gate = threading.Event()
        started = backend.started
        first = asyncio.ensure_future(batcher.submit_many([_x(0.0)], time.monotonic() + 10))
        await _until(lambda: _now(backend.started == started + 1))  # held in the backend
        tiles = [_x(0.5) for _ in range(20)]
        many = asyncio.ensure_future(batcher.submit_many(tiles, time.monotonic() + 10))
        await _until(lambda: _now(batcher.depth == 20))
        single = asyncio.ensure_future(batcher.submit_many([_x(0.9)], time.monotonic() + 10))
        await _until(lambda: _now(batcher.depth == 21))
        backend.gate.set()
        _, _, (r,) = await asyncio.gather(first, many, single)
    finally:
        await batcher.stop()
    # batch ids: 1 the first image, then one tile, then the single image (FIFO would have made it 22)
    assert r.batch_id == 3


class _SpinningBackend(FakeBackend):
    """Computes on the calling thread until that thread has used ``cpu_s`` of CPU (then answers as FakeBackend)."""

    def __init__(self, bundle: Any, cpu_s: float) -> None:
        super().__init__(bundle)
        self.cpu_s = cpu_s

    def infer(self, batch: np.ndarray) -> np.ndarray:
        c0 = time.thread_time()
        while time.thread_time() - c0 < self.cpu_s:
            pass
        return super().infer(batch)


async def test_backend_call_cpu_is_counted_per_batch(bundle: object) -> None:
    """aoi_backend_call_cpu_seconds_total: the inference thread's CPU inside the backend's call, so the CPU a
    benchmark finds outside it is what the service adds. A backend burning 30 ms of CPU per call adds at least that
    per batch; one sleeping 30 ms per call adds far less (sleep uses no CPU)."""
    from service.inference.metrics import ServiceMetrics

    counted = {}
    for name, backend in (
        ("spinning", _SpinningBackend(bundle, 0.03)),
        ("sleeping", FakeBackend(bundle, delay_s=0.03)),  # type: ignore[arg-type]
    ):
        metrics = ServiceMetrics()
        batcher = DynamicBatcher(backend, max_batch_size=2, max_delay_ms=0, queue_size=8, metrics=metrics)
        await batcher.start()
        try:
            for i in range(3):
                await batcher.submit_many([_x(i / 10)], time.monotonic() + 10)
        finally:
            await batcher.stop()
        assert len(backend.calls) == 3
        counted[name] = metrics.backend_cpu._value.get()
    assert counted["spinning"] >= 3 * 0.03
    assert counted["sleeping"] < 0.03  # three calls' Python and numpy, not their 90 ms asleep
