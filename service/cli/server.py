"""uvicorn's server, told about SIGTERM before it waits for the requests in flight (graceful stop), and draining its
keep-alive connections the way a load balancer in front of several replicas needs (docs/replicas.md)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable, Generator, MutableMapping
from types import FrameType
from typing import Any, cast

import uvicorn

__all__ = ["StoppingServer"]

_Message = MutableMapping[str, Any]
_Send = Callable[[_Message], Awaitable[None]]
_App = Callable[[_Message, Callable[[], Awaitable[_Message]], _Send], Awaitable[None]]


class _CloseWhileDraining:
    """Pure ASGI around the app: once the server drains, every answer says ``Connection: close`` (uvicorn then closes
    the connection after it), so a client or load balancer never sends another request on it."""

    def __init__(self, app: _App, server: StoppingServer) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: _Message, receive: Callable[[], Awaitable[_Message]], send: _Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_closing(message: _Message) -> None:
            if message["type"] == "http.response.start" and self.server.draining:
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        await self.app(scope, receive, send_closing)


class StoppingServer(uvicorn.Server):
    """On SIGTERM / SIGINT every answer from then on closes its connection, and the listening socket closes (a new
    connection is refused, so a load balancer sends it to another replica without having sent it anything); each open
    connection answers its request in flight, or the next one it brings, and closes; one left idle closes when its
    keep-alive timer runs out as at any other time, never under a client that may be sending on it. Then
    :meth:`InspectionService.begin_stop` (readiness 503, anything still arriving 503 ``shutting_down``), uvicorn lets
    the admitted requests finish within what is left of its graceful timeout, and the lifespan flushes records and
    the outbox."""

    def __init__(self, config: uvicorn.Config, app: object) -> None:
        config.app = _CloseWhileDraining(cast(_App, config.app), self)
        super().__init__(config)
        self._app = app
        self.draining = False

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """uvicorn's, except that a stop it completed gracefully exits with 0 (uvicorn re-raises the signal, so the
        process would end "killed by SIGTERM" after a clean stop, which supervisors report as a failure)."""
        with super().capture_signals():
            yield
            self._captured_signals.clear()

    def _service(self) -> Any:
        """The app's InspectionService (None before the lifespan started it)."""
        return getattr(getattr(self._app, "state", None), "service", None)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.draining = True  # a flag only: this runs in the signal handler
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:  # stop accepting now; uvicorn's own shutdown below does it again, harmlessly
            server.close()
        for sock in sockets or []:
            sock.close()
        graceful = self.config.timeout_graceful_shutdown
        t0 = time.monotonic()
        # Every connection idle at the signal has closed once its keep-alive timer ran out (uvicorn arms it after
        # each answer); a connection that brought a request since closed after its answer.
        bound = self.config.timeout_keep_alive + 0.5
        if graceful is not None:
            bound = min(bound, graceful / 2)
        while self.server_state.connections and not self.force_exit and time.monotonic() - t0 < bound:
            await asyncio.sleep(0.05)
        service = self._service()
        if service is not None:
            service.begin_stop()
        if graceful is not None:
            self.config.timeout_graceful_shutdown = max(1, round(graceful - (time.monotonic() - t0)))
        await super().shutdown(sockets)
