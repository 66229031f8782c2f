"""Over-limit bodies and wrong methods against a real uvicorn server: a readable 413 (not a reset), 405 with Allow."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from service.core.bundle import ModelBundle
from service.http.app import create_app
from service.settings import Settings
from tests.service.conftest import FakeBackend, uvicorn_thread

pytestmark = pytest.mark.integration

LIMIT = 1024 * 1024


@pytest.fixture(scope="module")
def port(bundle: ModelBundle) -> Iterator[int]:
    app = create_app(Settings(max_upload_bytes=LIMIT), bundle=bundle, backend=FakeBackend(bundle))
    with uvicorn_thread(app) as free:
        yield free


def _exchange(port: int, head: bytes, body_chunks: list[bytes]) -> tuple[int, dict[str, str], dict[str, object]]:
    """Send the request whole (as a client that sends before it reads), then read the answer to the end."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        conn.sendall(head)
        for chunk in body_chunks:
            conn.sendall(chunk)  # a reset here (ECONNRESET / EPIPE) is what this test forbids
        data = b""
        while True:
            part = conn.recv(65536)
            if not part:
                break
            data += part
    head_text, _, payload = data.partition(b"\r\n\r\n")
    lines = head_text.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, json.loads(payload)


def test_declared_over_limit_body_gets_a_readable_413(port: int) -> None:
    size = 8 * LIMIT
    head = (f"POST /v1/inspect HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\nContent-Length: {size}\r\n"
            "X-Request-ID: big-1\r\n\r\n").encode()  # fmt: skip
    status, headers, body = _exchange(port, head, [b"\0" * LIMIT for _ in range(8)])
    assert status == 413 and headers.get("connection") == "close"
    assert (
        body["code"] == "payload_too_large" and body["request_id"] == "big-1" and "max_upload_bytes" in body["message"]
    )


def test_chunked_over_limit_body_gets_a_readable_413(port: int) -> None:
    head = b"POST /v1/inspect HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
    piece = b"\0" * (256 * 1024)
    chunks = [b"%x\r\n" % len(piece) + piece + b"\r\n" for _ in range(12)] + [b"0\r\n\r\n"]
    status, headers, body = _exchange(port, head, chunks)
    assert status == 413 and headers.get("connection") == "close" and body["code"] == "payload_too_large"


def test_wrong_method_is_405_with_allow_and_a_json_body(port: int) -> None:
    status, headers, body = _exchange(port, b"GET /v1/inspect HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", [])
    assert status == 405 and headers.get("allow") == "POST"
    assert body["code"] == "method_not_allowed" and body["request_id"]
