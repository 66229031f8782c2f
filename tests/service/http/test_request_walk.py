"""The walk of one POST /v1/inspect (docs/architecture.md): which project files run code while it is answered.

A profile hook on every thread records the files of every Python function called while one tiled, NG, durably
recorded request is answered. Outside the walk are the HTTP frame around the route, data-only modules, the metrics
observers, the backend and the background threads' modules; what remains is the walk a newcomer follows, and it
must stay at the ten files the architecture page lists (a new module on the path fails this test until the page and
this list say where it goes)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pytest

import service
from service.settings import RecordsSettings, Settings, SignalsSettings, WebhookSettings
from tests.service.conftest import serve
from tests.service.signals.test_signals import Receiver, receiver  # noqa: F401 (the fixture)
from tests.synthetic import encode_image

pytestmark = pytest.mark.anyio

# The ten files of docs/architecture.md's walk, route first.
WALK = {
    "http/routes/inspect.py",
    "inference/pipeline.py",
    "inference/admission.py",
    "inference/serving.py",
    "inference/batching.py",
    "core/frames.py",
    "core/preprocess.py",
    "core/postprocess.py",
    "records/store.py",
    "signals/hub.py",
}
# What runs but is not the walk: the HTTP frame around every route, data and settings, metrics, the backend, and the
# modules of the threads the request hands over to (records writer, outbox, senders).
OUTSIDE = {
    "http/app.py",
    "http/middleware.py",
    "http/deps.py",
    "http/auth.py",
    "http/errors.py",
    "http/schemas.py",
    "log_config.py",
    "settings.py",
    "core/results.py",
    "core/errors.py",
    "core/bundle.py",
    "core/backend.py",
    "inference/metrics.py",
    "inference/threads.py",
    "records/metrics.py",
    "records/record.py",
    "records/writer.py",
    "records/schema.py",
    "records/archive.py",
    "signals/metrics.py",
    "signals/sink.py",
    "signals/outbox.py",
    "signals/webhook.py",
    "lifecycle/memory.py",  # the idle memory trimmer: a task of its own on the loop
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class _Files:
    """A ``sys.setprofile`` hook that collects the service files whose functions are called."""

    def __init__(self) -> None:
        self.root = Path(service.__file__).parent
        self.seen: set[str] = set()

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            name = frame.f_code.co_filename
            if name.startswith(str(self.root)):
                self.seen.add(Path(name).relative_to(self.root).as_posix())


async def test_one_post_walks_ten_files(tiled_bundle: Path, tmp_path: Path, receiver: Receiver) -> None:  # noqa: F811
    settings = Settings(
        bundle=tiled_bundle,
        backend="onnxruntime-cpu",
        max_delay_ms=0,
        data_dir=tmp_path / "data",
        records=RecordsSettings(durability="durable"),
        signals=SignalsSettings(webhook=WebhookSettings(url=receiver.url)),  # the verdict goes out through the hub
    )
    img = np.zeros((96, 160, 3), np.uint8)
    img[20:60, 30:110, 0] = 255  # a red patch across tiles: NG, recorded with its image
    data = encode_image(img, "png")
    async with serve(settings) as client:
        warm = await client.post("/v1/inspect", content=data, headers={"content-type": "image/png"})
        assert warm.status_code == 200, warm.text
        files = _Files()
        threading.setprofile(files)
        sys.setprofile(files)
        try:
            r = await client.post("/v1/inspect?camera_id=c1", content=data, headers={"content-type": "image/png"})
        finally:
            sys.setprofile(None)
            threading.setprofile(None)  # type: ignore[arg-type]
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["verdict"] == "NG" and body["tiling"]["tiled"], body  # the tile, merge and record steps all ran
    walk = files.seen - OUTSIDE - {p for p in files.seen if p.startswith("backends/")}
    assert walk == WALK, f"not on the documented walk: {sorted(walk - WALK)}; not run: {sorted(WALK - walk)}"
    assert len(WALK) <= 10
