"""A client that closes its connection before the answer: its work is dropped, not computed for nobody (real
uvicorn: only a real server tells the app that the peer went away)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from service.core.bundle import ModelBundle
from service.http.app import create_app
from service.settings import Settings
from tests.service.conftest import uvicorn_thread
from tests.service.inference.test_batching import _EnteredBackend
from tests.synthetic import make_image_bytes

pytestmark = pytest.mark.integration


@pytest.fixture
def served(bundle: ModelBundle) -> Iterator[tuple[int, _EnteredBackend]]:
    backend = _EnteredBackend(bundle)
    settings = Settings(max_batch_size=1, max_delay_ms=0, deadline_ms=20000, instances=1)
    with uvicorn_thread(create_app(settings, bundle=bundle, backend=backend)) as port:
        try:
            yield port, backend
        finally:
            if backend.gate is not None:
                backend.gate.set()


def _post(port: int, body: bytes) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=20)
    head = f"POST /v1/inspect HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
    conn.sendall(head.encode() + body)
    return conn


def _metrics(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = b""
        while part := conn.recv(65536):
            data += part
    return data.decode()


def _until(predicate: object, timeout_s: float = 10.0) -> None:
    t_end = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < t_end, "condition not reached"
        time.sleep(0.02)


def test_work_of_a_client_that_left_is_dropped(served: tuple[int, _EnteredBackend]) -> None:
    port, backend = served
    backend.gate = threading.Event()
    backend.entered.clear()
    started = backend.started  # warm-up calls
    img = make_image_bytes(16, 16, "png")
    held = _post(port, img)  # its batch is held in the backend
    assert backend.entered.wait(10)
    gone = _post(port, img)  # queued behind it
    _until(lambda: "aoi_queue_depth 1.0" in _metrics(port))
    gone.close()  # the client leaves before its answer
    _until(lambda: 'aoi_requests_rejected_total{reason="client_gone"} 1.0' in _metrics(port))
    backend.gate.set()
    answer = held.recv(65536)
    held.close()
    assert answer.startswith(b"HTTP/1.1 200")
    _until(lambda: "aoi_queue_depth 0.0" in _metrics(port))
    time.sleep(0.3)  # were the dropped input batched, its backend call would start at once
    assert backend.started == started + 1  # only the request whose client stayed reached the backend
    assert "aoi_model_inputs_processed_total 1.0" in _metrics(port)
