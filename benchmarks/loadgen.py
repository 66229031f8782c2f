"""A lean HTTP/1.1 keep-alive client for load generation (``aoi bench service``).

On a small box the load generator shares the CPU with the service it measures, so its own cost per request is part
of the figure. A general client (httpx) spends about a millisecond of Python per request on header models, URL
handling and pool bookkeeping; this one writes a pre-built request and parses just the status line and the body
length, a few tens of microseconds. It speaks only what the benchmark needs: GET and POST with a body,
``Content-Length`` or chunked responses, keep-alive with a bounded pool of connections.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

__all__ = ["HttpLoadClient", "LoadClientError"]


class LoadClientError(OSError):
    """The server closed the connection or sent something that is not an HTTP/1.1 response."""


class _Closed(Exception):
    """The server closed the connection before sending any byte of the response."""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def exchange(self, request: bytes) -> tuple[int, bytes, bool]:
        """Send one request; returns (status, body, keep-alive)."""
        self.writer.write(request)
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise _Closed from exc  # closed before answering (an idle keep-alive connection timed out)
            raise LoadClientError(f"connection closed inside a response head: {exc.partial[:40]!r}") from exc
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise _Closed from exc  # reset before answering: the same case, seen as a reset
        except asyncio.LimitOverrunError as exc:
            raise LoadClientError("HTTP response head over 64 KiB") from exc
        if not head.startswith(b"HTTP/1.") or len(head) < 12 or not head[9:12].isdigit():
            raise LoadClientError(f"not an HTTP/1.x response: {head[:40]!r}")
        status = int(head[9:12])
        headers = head.lower()
        keep_alive = b"\r\nconnection: close" not in headers
        i = headers.find(b"\r\ncontent-length:")
        if i >= 0:
            j = headers.index(b"\r\n", i + 2)
            body = await self.reader.readexactly(_number(headers[i + 17 : j], 10, "Content-Length"))
        elif b"\r\ntransfer-encoding: chunked" in headers:
            body = await self._chunked()
        else:  # no framing: the body runs to the end of the connection
            body, keep_alive = await self.reader.read(), False
        return status, body, keep_alive

    async def _chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size = _number((await self.reader.readuntil(b"\r\n")).split(b";", 1)[0], 16, "chunk size")
            if size == 0:
                await self.reader.readuntil(b"\r\n")  # no trailers are sent by the servers we measure
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    def close(self) -> None:
        self.writer.close()


def _number(text: bytes, base: int, what: str) -> int:
    try:
        value = int(text.strip(), base)
    except ValueError:
        raise LoadClientError(f"malformed {what} in an HTTP response: {text[:40]!r}") from None
    if value < 0:
        raise LoadClientError(f"negative {what} in an HTTP response: {value}")
    return value


class HttpLoadClient:
    """Keep-alive connections to one ``host:port``, opened on demand up to ``max_connections`` at a time.

    Usage: ``client = HttpLoadClient("127.0.0.1", 8000)``, ``status, body = await client.post(path, data, ctype)``,
    ``await client.close()``. Errors on a connection close that connection and raise :class:`LoadClientError`
    (or the ``OSError`` of a refused connection), as does a response not complete within ``timeout_s``.
    """

    def __init__(self, host: str, port: int, *, max_connections: int = 64, timeout_s: float = 60.0) -> None:
        self.host, self.port = host, port
        self.timeout_s = timeout_s
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._open: set[_Connection] = set()

    @staticmethod
    def build_request(
        method: str,
        path: str,
        host: str,
        body: bytes = b"",
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> bytes:
        """The bytes of one HTTP/1.1 request (pre-build it once and pass it to :meth:`send`); ``headers``: more
        header lines (e.g. the Open Inference Protocol's ``Inference-Header-Content-Length``)."""
        lines = [f"{method} {path} HTTP/1.1", f"host: {host}"]
        if content_type is not None:
            lines.append(f"content-type: {content_type}")
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if body or method in ("POST", "PUT"):
            lines.append(f"content-length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """Send pre-built request bytes on an idle (or new) connection; returns (status, body)."""
        async with self._slots:
            conn = self._take_idle()
            reused = conn is not None
            while True:
                if conn is None:
                    conn = await self._connect()
                try:
                    status, body, keep_alive = await self._exchange(conn, request)
                    break
                except _Closed as exc:
                    self._discard(conn)
                    if not reused:
                        raise LoadClientError(
                            f"{self.host}:{self.port} closed a new connection without answering"
                        ) from exc
                    conn, reused = None, False  # a reused connection the server had closed: retry once on a fresh one
                except BaseException:
                    self._discard(conn)
                    raise
            if keep_alive:
                self._idle.append(conn)
            else:
                self._discard(conn)
            return status, body

    async def _exchange(self, conn: _Connection, request: bytes) -> tuple[int, bytes, bool]:
        try:
            return await asyncio.wait_for(conn.exchange(request), self.timeout_s)
        except TimeoutError as exc:
            raise LoadClientError(f"{self.host}:{self.port}: no whole response within {self.timeout_s:g} s") from exc
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            raise LoadClientError(f"connection to {self.host}:{self.port} lost: {exc}") from exc

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        return await self.send(self.build_request("POST", path, self.host, body, content_type))

    async def get(self, path: str) -> tuple[int, bytes]:
        return await self.send(self.build_request("GET", path, self.host))

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.reader.at_eof():
                return conn
            self._discard(conn)
        return None

    async def _connect(self) -> _Connection:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        conn = _Connection(reader, writer)
        self._open.add(conn)
        return conn

    def _discard(self, conn: _Connection) -> None:
        self._open.discard(conn)
        conn.close()

    async def close(self) -> None:
        conns = list(self._open)
        for conn in conns:
            self._discard(conn)
        self._idle.clear()
        for conn in conns:
            with contextlib.suppress(OSError):  # the peer reset it: closed all the same
                await conn.writer.wait_closed()
