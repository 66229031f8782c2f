"""service/lifecycle/memory.py: memory handed back after a burst, worker threads below the event loop's priority."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

import pytest

from service.inference.threads import lower_thread_priority
from service.lifecycle import memory
from service.lifecycle.memory import GcPauses, freeze_heap, refreeze_heap, release_free_memory
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


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_frozen_heap_is_out_of_collections_until_refrozen() -> None:
    import gc
    import weakref

    assert gc.get_freeze_count() == 0
    refreeze_heap()
    assert gc.get_freeze_count() == 0  # never frozen: nothing to do
    node = _Node()
    ref = weakref.ref(node)
    try:
        freeze_heap()
        assert gc.get_freeze_count() > 0
        del node
        gc.collect()
        assert ref() is not None  # garbage now, but frozen: a full collection does not look at it
        refreeze_heap()
        assert ref() is None and gc.get_freeze_count() > 0  # thawed, collected, the survivors frozen again
    finally:
        gc.unfreeze()


def test_gc_pauses_are_timed_per_generation_until_stopped() -> None:
    import gc

    pauses = GcPauses()
    pauses.start()
    pauses.start()  # idempotent: hooked once
    try:
        assert gc.callbacks.count(pauses._hook) == 1
        gc.collect(0)
        gc.collect(2)
        seen = pauses.drain()
        assert [g for g, _ in seen][-2:] == [0, 2] and all(0 <= s < 10 for _, s in seen)
        assert pauses.drain() == []  # drained
    finally:
        pauses.stop()
    assert pauses._hook not in gc.callbacks
    gc.collect()
    assert pauses.drain() == []


@pytest.mark.anyio
async def test_service_exports_gc_pauses(bundle: object) -> None:
    import gc

    async with serve(Settings(), bundle=bundle, backend=FakeBackend(bundle)) as client:
        gc.collect()
        t_end = time.monotonic() + 5
        text = ""
        while time.monotonic() < t_end and 'aoi_gc_pause_seconds_count{generation="2"} 0.0' in (
            text := (await client.get("/metrics")).text
        ):
            await asyncio.sleep(0.2)
        count = next(
            float(line.split()[-1]) for line in text.splitlines()
            if line.startswith('aoi_gc_pause_seconds_count{generation="2"}')
        )  # fmt: skip
        assert count >= 1


@pytest.mark.anyio
async def test_memory_is_handed_back_once_the_service_is_idle(bundle: object, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []
    monkeypatch.setattr(memory, "release_free_memory", lambda: calls.append(time.monotonic()) or True)
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
