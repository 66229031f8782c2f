"""The lean HTTP load client of ``aoi bench service`` against a scripted server."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.loadgen import HttpLoadClient, LoadClientError

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _scripted_server() -> tuple[asyncio.Server, int, list[int]]:
    """Answers by path: /len (Content-Length), /chunked, /close (Connection: close), /drop (answers, then closes
    without saying so: a keep-alive connection that timed out), /hangup-next (answers, then closes on the next
    request without answering it), /garbage (not HTTP). Counts connections."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        hang_up_next = False
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if hang_up_next:  # read the request, then close without a byte of answer
                    break
                path = head.split(b" ", 2)[1]
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.lower().split(b"\r\n")
                        if line.startswith(b"content-length")
                    ),
                    0,
                )
                body = await reader.readexactly(length)
                if path == b"/len":
                    msg = b"echo:" + body
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s" % (len(msg), msg)
                    )
                elif path == b"/chunked":
                    writer.write(
                        b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
                    )
                elif path == b"/close":
                    writer.write(
                        b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 2\r\n\r\nno"
                    )
                    await writer.drain()
                    break
                elif path == b"/hangup-next":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    hang_up_next = True
                elif path == b"/bad-length":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: lots\r\n\r\n")
                elif path == b"/silent":  # reads the request, never answers; ends when the client hangs up
                    await reader.read()
                    break
                elif path == b"/drop":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    await writer.drain()
                    break
                else:
                    writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
                    await writer.drain()
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, port, connections


async def test_load_client_framing_keepalive_and_errors() -> None:
    server, port, connections = await _scripted_server()
    client = HttpLoadClient("127.0.0.1", port, max_connections=4)
    try:
        req = client.build_request("POST", "/len", "127.0.0.1", b"frame-bytes", "image/jpeg")
        assert b"content-length: 11\r\n" in req and req.endswith(b"\r\n\r\nframe-bytes")
        for _ in range(3):  # keep-alive: one connection for sequential requests
            assert await client.send(req) == (200, b"echo:frame-bytes")
        assert len(connections) == 1
        assert await client.get("/chunked") == (201, b"abcde")
        assert await client.get("/close") == (503, b"no")  # the client drops that connection itself
        assert await client.get("/drop") == (200, b"ok")
        await asyncio.sleep(0.05)  # the server has closed the idle connection by now
        assert await client.send(req) == (200, b"echo:frame-bytes")  # reconnects instead of failing
        assert await client.get("/hangup-next") == (200, b"")
        before = len(connections)
        assert await client.send(req) == (200, b"echo:frame-bytes")  # closed unanswered: retried on a new one
        assert len(connections) == before + 1
        results = await asyncio.gather(*(client.send(req) for _ in range(8)))  # at most 4 connections at once
        assert all(r == (200, b"echo:frame-bytes") for r in results)
        with pytest.raises(LoadClientError, match="not an HTTP"):
            await client.get("/garbage")
        with pytest.raises(LoadClientError, match="malformed Content-Length"):
            await client.get("/bad-length")
        client.timeout_s = 0.2
        with pytest.raises(LoadClientError, match=r"no whole response within 0\.2 s"):
            await client.get("/silent")
    finally:
        await client.close()
        server.close()
        await server.wait_closed()
    with pytest.raises(OSError):
        await HttpLoadClient("127.0.0.1", port).get("/len")  # nothing listens any more
