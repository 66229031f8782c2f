"""Service test fixtures: a synthetic bundle, a FakeBackend, and an in-process HTTP client inside the lifespan."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from asgi_lifespan import LifespanManager

from service.backends.base import run_warmup
from service.core.bundle import ModelBundle, TilingSpec, load_bundle, write_bundle
from service.http.app import create_app
from service.settings import Settings
from tests.synthetic import make_synthetic_bundle, synthetic_output


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="session")
def bundle(bundle_dir: Path) -> ModelBundle:
    return load_bundle(bundle_dir)


@pytest.fixture(scope="session")
def tiled_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic bundle with a native tile of 64 frame px (its input size: scale 1), overlap 0.25."""
    root = make_synthetic_bundle(tmp_path_factory.mktemp("tiled"))
    bundle = load_bundle(root)
    write_bundle(bundle.model_copy(update={"tiling": TilingSpec(tile_width=64, tile_height=64, source="test")}), root)
    return root


class FakeBackend:
    """Computes the synthetic model in numpy; records batch sizes; can be slowed down or made to fail."""

    kind = "fake"
    device = "cpu"
    precision = "fp32"

    def __init__(self, bundle: ModelBundle, *, max_batch: int = 8, delay_s: float = 0.0) -> None:
        self.bundle = bundle
        self.batch_sizes = tuple(range(1, max_batch + 1))
        self.delay_s = delay_s
        self.calls: list[int] = []
        self.started = 0  # calls that entered ``infer`` (counted before ``gate``)
        self.fail_when: Callable[[np.ndarray], bool] = lambda x: False
        self.gate: threading.Event | None = None
        self.closed = False

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.started += 1
        if self.gate is not None:
            self.gate.wait(5)
        if self.delay_s:
            time.sleep(self.delay_s)
        self.calls.append(batch.shape[0])
        if self.fail_when(batch):
            raise RuntimeError("simulated GPU fault")
        return synthetic_output(batch, self.bundle.nc)

    def warmup(self) -> dict[int, float]:
        return run_warmup(self, self.bundle)

    def close(self) -> None:
        self.closed = True


@contextmanager
def uvicorn_thread(app: Any) -> Iterator[int]:
    """Run ``app`` on a real uvicorn server (a thread, 127.0.0.1, a free port) for tests that need what only a real
    server does (reading bodies off a socket, telling the app that a client left); yields the port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t_end = time.monotonic() + 30
    while not server.started and time.monotonic() < t_end:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start within 30 s"
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(15)


@asynccontextmanager
async def serve(settings: Settings, **kw: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, **kw)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client
