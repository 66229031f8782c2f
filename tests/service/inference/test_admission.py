"""Admission before decoding: a request that does not fit beside the queued and decoding work is refused (503 with
Retry-After) without its image being decoded; one that can never fit is a 413."""

from __future__ import annotations

import asyncio
import struct
import threading
import time

import httpx
import pytest
from asgi_lifespan import LifespanManager

from service.core.errors import DecodeBusy, MemoryBusy, RequestTooCostly, WouldMissDeadline
from service.http.app import create_app
from service.http.errors import status_of
from service.inference.admission import Admission
from service.inference.batching import DrainRate
from service.inference.metrics import SlidingRate
from service.settings import Settings
from tests.service.conftest import FakeBackend, serve
from tests.service.inference.test_batching import _EnteredBackend, _until
from tests.synthetic import make_image_bytes


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _png_header_then_garbage(width: int = 16, height: int = 16) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\0\0\0\0" + b"garbage" * 20


async def _fill_the_queue(
    client: httpx.AsyncClient, backend: _EnteredBackend, headers: dict[str, str]
) -> tuple[asyncio.Future[httpx.Response], asyncio.Future[httpx.Response]]:
    """With ``queue_size=1`` and ``max_batch_size=1``: one request held in the backend, one filling the queue."""
    backend.gate = threading.Event()
    backend.entered.clear()
    img = make_image_bytes(16, 16, "png")
    first = asyncio.ensure_future(client.post("/v1/inspect", content=img, headers=headers))  # held in the backend
    await _until(lambda: asyncio.to_thread(backend.entered.wait, 0.05))
    second = asyncio.ensure_future(client.post("/v1/inspect", content=img, headers=headers))  # fills the queue

    async def queued() -> bool:
        return "aoi_queue_depth 1.0" in (await client.get("/metrics")).text

    await _until(queued)
    return first, second


@pytest.mark.anyio
async def test_overload_is_refused_before_decoding(bundle: object) -> None:
    backend = _EnteredBackend(bundle)
    settings = Settings(max_batch_size=1, max_delay_ms=0, queue_size=1, deadline_ms=5000)
    async with serve(settings, bundle=bundle, backend=backend) as client:
        png = {"content-type": "image/png"}
        first, second = await _fill_the_queue(client, backend, png)
        # not an image past its header: decoding it would answer 422, so a 503 proves nothing was decoded
        refused = await client.post("/v1/inspect", content=_png_header_then_garbage(), headers=png)
        assert refused.status_code == 503 and refused.json()["code"] == "overloaded", refused.text
        assert refused.headers["retry-after"] == "1" and "queue_size" in refused.json()["message"]
        backend.gate.set()
        r1, r2 = await asyncio.gather(first, second)
        assert (r1.status_code, r2.status_code) == (200, 200)
        # once answered, the same bad bytes are admitted and decoded: now the 422
        late = await client.post("/v1/inspect", content=_png_header_then_garbage(), headers=png)
        assert late.status_code == 422, late.text


@pytest.mark.anyio
async def test_a_request_larger_than_the_queue_is_413_not_503(bundle: object) -> None:
    backend = _EnteredBackend(bundle)
    async with serve(Settings(max_delay_ms=0, queue_size=2), bundle=bundle, backend=backend) as client:
        files = [("images", (f"{i}.png", make_image_bytes(16, 16, "png"), "image/png")) for i in range(3)]
        r = await client.post("/v1/inspect", files=files)
        assert r.status_code == 413 and "queue_size" in r.json()["message"], r.text


# --- the admission rules, on a stand-in for the batcher (what Admission reads of it) ---------------------------------


class _Queue:
    def __init__(self, depth: int = 0, queue_size: int = 512, rate: float | None = None, batch_s: float = 0.0) -> None:
        self.depth, self.queue_size, self.batch_s = depth, queue_size, batch_s
        self.drain = DrainRate()
        now = time.monotonic()
        for _ in range(8 if rate is not None else 0):
            self.drain.add(ahead=10, wait_s=10 / rate, now=now)  # type: ignore[operator]

    def ahead_of(self, need: int) -> int:
        return self.depth  # as if each queued input were a request of its own


def _admission(queue: _Queue, *, decode_queue_images: int = 64, by_deadline: bool = True) -> Admission:
    return Admission(
        queue,  # type: ignore[arg-type]
        decode_queue_images=decode_queue_images,
        by_deadline=by_deadline,
        deadline_s=2.0,
        answered=SlidingRate(10.0),
    )


def test_drain_rate_is_the_median_of_fresh_samples() -> None:
    rate = DrainRate(samples=8, max_age_s=5.0)
    assert rate.rate(100.0) is None  # nothing measured
    for i, (ahead, wait) in enumerate([(10, 1.0), (20, 1.0), (30, 1.0), (0, 1.0), (40, 0.0)]):
        rate.add(ahead, wait, 100.0 + i)  # the last two are no samples: nothing ahead, no wait
    assert rate.rate(104.0) is None  # three samples are too few to trust
    rate.add(50, 1.0, 105.0)
    assert rate.rate(105.0) == 30.0  # median of 10, 20, 30, 50 (upper middle)
    assert rate.rate(106.5) == 50.0 or rate.rate(106.5) is None  # samples older than 5 s drop out
    assert rate.rate(200.0) is None


def test_a_request_the_backlog_would_keep_past_its_deadline_is_refused_at_once() -> None:
    now = time.monotonic()
    # 10 inputs/s drain, 20 queued: the 21st would be answered in ~2.1 s, past 0.75 x a 2 s deadline
    with pytest.raises(WouldMissDeadline) as info:
        _admission(_Queue(depth=20, rate=10.0)).check(1, 1, now, now + 2.0)
    assert info.value.retry_after_s == 2 and "deadline_ms" in info.value.message
    assert status_of(info.value) == 503 and info.value.reason == "deadline"
    _admission(_Queue(depth=13, rate=10.0)).check(1, 1, now, now + 2.0)  # 1.4 s: admitted
    _admission(_Queue(depth=20, rate=10.0), by_deadline=False).check(1, 1, now, now + 2.0)  # rule off
    _admission(_Queue(depth=20, rate=None)).check(1, 1, now, now + 2.0)  # no rate measured yet: capacity only
    with pytest.raises(WouldMissDeadline):  # the inputs of the request itself count: 5 queued + 12 tiles
        _admission(_Queue(depth=5, rate=10.0)).check(12, 1, now, now + 2.0)


def test_the_decode_stage_is_bounded() -> None:
    admission = _admission(_Queue(), decode_queue_images=4)
    now = time.monotonic()
    with admission.hold(3, 3):
        admission.check(1, 1, now, now + 2.0)  # 3 + 1 images fit
        with pytest.raises(DecodeBusy) as info:
            admission.check(2, 2, now, now + 2.0)
        assert "decode_queue_images" in info.value.message and info.value.reason == "decode_full"
        assert admission.backlog == 3
    assert admission.decoding_images == 0 and admission.backlog == 0  # released
    admission.check(4, 4, now, now + 2.0)


# --- per-request budgets over HTTP --------------------------------------------------------------------------------


def _files(n: int, side: int = 30) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"{i}.png", make_image_bytes(side, side, "png"), "image/png")) for i in range(n)]


@pytest.mark.anyio
async def test_pixels_per_request_are_budgeted_before_decoding(bundle: object) -> None:
    async with serve(Settings(max_request_pixels=1000), bundle=bundle, backend=FakeBackend(bundle)) as client:
        r = await client.post("/v1/inspect", files=_files(2))  # 2 x 900 pixels
        body = r.json()
        assert r.status_code == 413 and body["code"] == "request_too_costly", r.text
        assert "max_request_pixels" in body["message"] and body["request_id"]
        assert (await client.post("/v1/inspect", files=_files(1))).status_code == 200


@pytest.mark.anyio
async def test_images_per_request_over_the_limit_is_413_naming_the_setting(bundle: object) -> None:
    async with serve(Settings(max_images_per_request=2), bundle=bundle, backend=FakeBackend(bundle)) as client:
        r = await client.post("/v1/inspect", files=_files(3))
        assert r.status_code == 413 and "max_images_per_request" in r.json()["message"], r.text
        assert (await client.post("/v1/inspect", files=_files(2))).status_code == 200


@pytest.mark.anyio
async def test_decode_time_per_request_is_budgeted(bundle: object) -> None:
    settings = Settings(max_decode_ms=0.001, decode_workers=1)  # the first image alone outlasts the budget
    async with serve(settings, bundle=bundle, backend=FakeBackend(bundle)) as client:
        r = await client.post("/v1/inspect", files=_files(3))
        assert r.status_code == 413 and "max_decode_ms" in r.json()["message"], r.text
        assert (await client.post("/v1/inspect", files=_files(1))).status_code == 200  # one image: nothing after it


@pytest.mark.anyio
async def test_a_failed_image_stops_the_images_not_decoded_yet(bundle: object) -> None:
    async with serve(Settings(decode_workers=1), bundle=bundle, backend=FakeBackend(bundle)) as client:
        bad = [("images", ("bad.png", _png_header_then_garbage(), "image/png"))]
        r = await client.post("/v1/inspect", files=bad + _files(3))
        assert r.status_code == 422 and "bad.png" in r.json()["message"], r.text
        metrics = (await client.get("/metrics")).text
        assert 'aoi_stage_duration_seconds_count{stage="decode"} 0.0' in metrics  # none of the 3 was decoded


def test_the_door_refuses_whatever_the_request_holds_when_nothing_fits() -> None:
    now = time.monotonic()
    assert _admission(_Queue(depth=10, rate=10.0)).at_the_door(now) is None  # ~1 s of backlog, 2 s deadline
    late = _admission(_Queue(depth=30, rate=10.0)).at_the_door(now)  # ~3 s
    assert isinstance(late, WouldMissDeadline) and late.retry_after_s == 3
    assert _admission(_Queue(depth=30, rate=10.0), by_deadline=False).at_the_door(now) is None
    full = _admission(_Queue(depth=8, queue_size=8)).at_the_door(now)
    assert full is not None and full.reason == "queue_full" and "queue_size" in full.message
    admission = _admission(_Queue(), decode_queue_images=2)
    with admission.hold(2, 2):
        busy = admission.at_the_door(now)
        assert isinstance(busy, DecodeBusy)


@pytest.mark.anyio
async def test_the_door_answers_before_the_body_with_the_request_id_and_lets_bad_keys_get_401(bundle: object) -> None:
    backend = _EnteredBackend(bundle)
    settings = Settings(max_batch_size=1, max_delay_ms=0, queue_size=1, deadline_ms=5000, auth={"inspect_keys": ["k"]})
    async with serve(settings, bundle=bundle, backend=backend) as client:
        first, second = await _fill_the_queue(client, backend, {"content-type": "image/png", "x-api-key": "k"})
        # a content type the route would refuse with 415: the 503 shows the route never saw the request
        r = await client.post("/v1/inspect", content=b"x", headers={"content-type": "text/plain", "x-api-key": "k",
                                                                   "x-request-id": "door-1"})  # fmt: skip
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.headers["x-request-id"] == "door-1"
        assert r.json() == {"code": "overloaded", "message": r.json()["message"], "request_id": "door-1"}
        img = make_image_bytes(16, 16, "png")
        stranger = await client.post("/v1/inspect", content=img, headers={"content-type": "image/png"})
        assert stranger.status_code == 401  # busy or not, no key: 401 (the door says nothing to strangers)
        metrics = (await client.get("/metrics")).text
        assert 'aoi_requests_rejected_total{reason="queue_full"} 1.0' in metrics
        backend.gate.set()
        r1, r2 = await asyncio.gather(first, second)
        assert (r1.status_code, r2.status_code) == (200, 200)


@pytest.mark.anyio
async def test_an_image_whose_deadline_passed_while_waiting_for_a_decoder_is_not_decoded(bundle: object) -> None:
    app = create_app(
        Settings(decode_workers=1, deadline_ms=200, decode_inline_pixels=0), bundle=bundle, backend=FakeBackend(bundle)
    )
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            busy = threading.Event()
            blocker = app.state.service.pool.submit(busy.wait, 10)  # the only decoder is taken
            img = make_image_bytes(16, 16, "png")
            pending = asyncio.ensure_future(
                client.post("/v1/inspect", content=img, headers={"content-type": "image/png"})
            )
            await asyncio.sleep(0.4)  # past the 200 ms deadline while its image waits for the decoder
            busy.set()
            r = await pending
            blocker.result()
            assert r.status_code == 504 and "waited to be decoded" in r.json()["message"], r.text
            metrics = (await client.get("/metrics")).text
            assert 'aoi_stage_duration_seconds_count{stage="decode"} 0.0' in metrics  # never decoded
            assert "aoi_requests_timed_out_total 1.0" in metrics


def test_decoded_pixels_held_by_admitted_requests_are_bounded() -> None:
    admission = Admission(
        _Queue(),  # type: ignore[arg-type]
        decode_queue_images=64,
        by_deadline=True,
        deadline_s=2.0,
        answered=SlidingRate(10.0),
        max_inflight_pixels=1000,
    )
    now = time.monotonic()
    with pytest.raises(RequestTooCostly, match="max_inflight_pixels"):  # can never fit: 413
        admission.check(1, 1, now, now + 2.0, pixels=1001)
    with admission.hold_pixels(600):
        admission.check(1, 1, now, now + 2.0, pixels=400)
        with pytest.raises(MemoryBusy, match="max_inflight_pixels") as info:
            admission.check(1, 1, now, now + 2.0, pixels=401)
        assert status_of(info.value) == 503 and info.value.reason == "memory_full"
        with admission.hold_pixels(400):
            assert isinstance(admission.at_the_door(now), MemoryBusy)
    assert admission.inflight_pixels == 0 and admission.at_the_door(now) is None


def test_the_request_budget_must_fit_in_the_inflight_budget() -> None:
    with pytest.raises(ValueError, match="max_inflight_pixels"):
        Settings(max_inflight_pixels=1000, max_request_pixels=2000)


@pytest.mark.anyio
async def test_one_small_image_is_decoded_on_the_event_loop_not_a_decode_thread(bundle: object) -> None:
    """decode_inline_pixels: with the only decode thread taken, a request of one small image is still answered (it is
    decoded on the loop); a larger one waits for the thread."""
    settings = Settings(decode_workers=1, decode_inline_pixels=32 * 32)
    app = create_app(settings, bundle=bundle, backend=FakeBackend(bundle))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            busy = threading.Event()
            blocker = app.state.service.pool.submit(busy.wait, 10)
            png = {"content-type": "image/png"}
            small = await client.post("/v1/inspect", content=make_image_bytes(32, 32, "png"), headers=png)
            assert small.status_code == 200, small.text
            large = asyncio.ensure_future(
                client.post("/v1/inspect", content=make_image_bytes(33, 33, "png"), headers=png)
            )
            await asyncio.sleep(0.3)
            assert not large.done()  # waiting for the decode thread
            busy.set()
            assert (await large).status_code == 200
            blocker.result()
