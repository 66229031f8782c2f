"""service/memory.py: memory handed back after a burst, worker threads below the event loop's priority."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

import pytest

from service import pipeline
from service.memory import lower_thread_priority, release_free_memory
from service.settings import Settings
from tests.service.conftest import FakeBackend, serve
from tests.synthetic import make_image_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_worker_threads_run_below_the_event_loop() -> None:
    seen: list[int] = []

    def worker() -> None:
        lower_thread_priority(3)()
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [min(19, base + 3)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # the calling thread is untouched


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_free_memory_calls_malloc_trim() -> None:
    assert release_free_memory() is True


@pytest.mark.anyio
async def test_memory_is_handed_back_once_the_service_is_idle(bundle: object, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []
    monkeypatch.setattr(pipeline, "release_free_memory", lambda: calls.append(time.monotonic()) or True)
    async with serve(Settings(), bundle=bundle, backend=FakeBackend(bundle)) as client:
        await asyncio.sleep(1.2)
        assert calls == []  # nothing admitted yet: nothing to hand back
        img = make_image_bytes(16, 16, "png")
        assert (await client.post("/v1/inspect", content=img, headers={"content-type": "image/png"})).status_code == 200
        t_end = time.monotonic() + 5
        while not calls and time.monotonic() < t_end:
            await asyncio.sleep(0.05)
        assert len(calls) == 1
        await asyncio.sleep(1.2)
        assert len(calls) == 1  # idle since: once is enough
