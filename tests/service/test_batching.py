"""service/batching.py without HTTP (batch formation, deadlines, overload, failure isolation) and through HTTP."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.batching import DynamicBatcher
from service.errors import BackendFailure, DeadlineExceeded, Overloaded
from service.settings import Settings
from tests.service.conftest import FakeBackend, serve
from tests.synthetic import make_image_bytes

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _x(value: float, size: int = 64) -> np.ndarray:
    return np.full((3, size, size), value, np.float32)


async def _with_batcher(backend: FakeBackend, **kw: float) -> DynamicBatcher:
    b = DynamicBatcher(
        backend,
        max_batch_size=int(kw.get("max_batch_size", 4)),
        max_delay_ms=kw.get("max_delay_ms", 50.0),
        queue_size=int(kw.get("queue_size", 16)),
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
        first = asyncio.ensure_future(batcher.submit_many([_x(0.1)], time.monotonic() + 5))
        await asyncio.sleep(0.05)  # the first batch (1 image) is now blocked in the backend
        rest = asyncio.ensure_future(batcher.submit_many([_x(0.2), _x(0.3)], time.monotonic() + 5))
        await asyncio.sleep(0.05)
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
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(batcher.submit_many([_x(0.2), _x(0.3)], time.monotonic() + 5))
        await asyncio.sleep(0.01)
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


async def test_http_overload_503_with_retry_after_and_deadline_504(bundle: object) -> None:
    backend = FakeBackend(bundle)  # type: ignore[arg-type]
    settings = Settings(max_batch_size=1, max_delay_ms=0, queue_size=1, deadline_ms=300)
    async with serve(settings, bundle=bundle, backend=backend) as client:
        backend.gate = threading.Event()
        img = make_image_bytes(16, 16, "png")
        post = lambda: client.post("/v1/inspect", content=img, headers={"content-type": "image/png"})  # noqa: E731
        first = asyncio.ensure_future(post())  # blocks inside the backend
        await asyncio.sleep(0.1)
        second = asyncio.ensure_future(post())  # fills the queue
        await asyncio.sleep(0.05)
        third = await post()
        assert third.status_code == 503 and third.headers["retry-after"] == "1"
        assert third.json()["code"] == "overloaded"
        r1, r2 = await asyncio.gather(first, second)
        backend.gate.set()
        assert {r1.status_code, r2.status_code} == {504}
        metrics = (await client.get("/metrics")).text
        assert "aoi_requests_timed_out_total 2.0" in metrics
        assert 'aoi_requests_rejected_total{reason="queue_full"} 1.0' in metrics
