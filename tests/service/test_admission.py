"""Admission before decoding: a request that does not fit beside the queued and decoding work is refused (503 with
Retry-After) without its image being decoded; one that can never fit is a 413."""

from __future__ import annotations

import asyncio
import struct
import threading

import pytest

from service.settings import Settings
from tests.service.conftest import serve
from tests.service.test_batching import _EnteredBackend, _until
from tests.synthetic import make_image_bytes

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _png_header_then_garbage(width: int = 16, height: int = 16) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\0\0\0\0" + b"garbage" * 20


async def test_overload_is_refused_before_decoding(bundle: object) -> None:
    backend = _EnteredBackend(bundle)
    settings = Settings(max_batch_size=1, max_delay_ms=0, queue_size=1, deadline_ms=5000)
    async with serve(settings, bundle=bundle, backend=backend) as client:
        backend.gate = threading.Event()
        backend.entered.clear()
        png = {"content-type": "image/png"}
        img = make_image_bytes(16, 16, "png")
        first = asyncio.ensure_future(client.post("/v1/inspect", content=img, headers=png))  # held in the backend
        await _until(lambda: asyncio.to_thread(backend.entered.wait, 0.05))
        second = asyncio.ensure_future(client.post("/v1/inspect", content=img, headers=png))  # fills the queue

        async def queued() -> bool:
            return "aoi_queue_depth 1.0" in (await client.get("/metrics")).text

        await _until(queued)
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


async def test_a_request_larger_than_the_queue_is_413_not_503(bundle: object) -> None:
    backend = _EnteredBackend(bundle)
    async with serve(Settings(max_delay_ms=0, queue_size=2), bundle=bundle, backend=backend) as client:
        files = [("images", (f"{i}.png", make_image_bytes(16, 16, "png"), "image/png")) for i in range(3)]
        r = await client.post("/v1/inspect", files=files)
        assert r.status_code == 413 and "queue_size" in r.json()["message"], r.text
