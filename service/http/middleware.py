"""The app's two pure-ASGI middlewares (cheaper than BaseHTTPMiddleware): the request context (request id, duration
and in-flight metrics, the last-resort 500) and the admission gate that refuses ``POST /v1/inspect`` (and the Open
Inference Protocol's ``POST /v2/models/.../infer``) at the door while
:meth:`~service.inference.admission.Admission.at_the_door` says so."""

from __future__ import annotations

import logging
import time

from starlette.requests import Request
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.errors import Overloaded, Unauthorized
from service.http.auth import check_api_key
from service.http.errors import error_body, protocol_v2, status_of
from service.inference.metrics import StageObserver
from service.log_config import new_request_id, request_id_var

__all__ = ["AdmissionGate", "RequestContextMiddleware"]

logger = logging.getLogger(__name__)


class RequestContextMiddleware:
    """Pure ASGI (cheaper than BaseHTTPMiddleware): request id from ``X-Request-ID`` or generated, echoed back; request
    duration by route and status; in-flight gauge. A path is labelled with its route's template
    (``/v2/models/{name}/infer``, so the autoscaling query sees v2 inference); paths outside ``routes`` share the
    label ``other``."""

    def __init__(self, app: ASGIApp, metrics: StageObserver, routes: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes
        # Templated routes, most specific first (fewest parameters), matched only when the exact lookup misses.
        templated = sorted((p for p in routes if "{" in p), key=lambda p: (p.count("{"), p))
        self._templates = [(compile_path(p)[0], p) for p in templated]

    def _label(self, path: str) -> str:
        if path in self.routes:
            return path
        return next((template for regex, template in self._templates if regex.match(path)), "other")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")[:128]
        rid = rid or new_request_id()
        token = request_id_var.set(rid)
        path = scope["path"]
        route = self._label(path)
        status = 500
        started = False
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        self.metrics.request_started()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Answered here, not by Starlette's outermost error middleware: that one runs after the request id is
            # gone and sends without the X-Request-ID header. A response already under way cannot be replaced.
            if started:
                raise
            logger.exception("unhandled error on %s %s", scope.get("method"), path)
            self.metrics.request_failed("internal_error")
            await _send_internal_error(send_with_id, protocol_v2(path))
        finally:
            self.metrics.request_finished(route, status, time.perf_counter() - start)
            request_id_var.reset(token)


async def _send_internal_error(send: Send, v2: bool) -> None:
    body = error_body("internal_error", "internal error; see the service log", v2=v2)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 500, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class AdmissionGate:
    """Pure ASGI, inside the request-id middleware: while :meth:`Admission.at_the_door` refuses, ``POST
    /v1/inspect`` and ``POST /v2/models/.../infer`` are answered 503 (JSON with the request id, ``Retry-After``;
    the protocol's ``{"error"}`` on v2) before the body is read or FastAPI routes it: a refusal costs a fraction of a
    millisecond, so clients retrying in a loop cannot take the CPU the admitted requests need (uvicorn discards the
    unread body and keeps the connection). A request whose API key is not accepted passes on to get its 401."""

    def __init__(self, app: ASGIApp, path: str = "/v1/inspect") -> None:
        self.app = app
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and self._gated(scope["path"]):
            state = scope["app"].state
            service = getattr(state, "service", None)
            refusal = service.admission.at_the_door(time.monotonic()) if service is not None else None
            if refusal is not None and self._key_accepted(scope):
                state.metrics.request_rejected(refusal.reason)
                await _send_refusal(send, refusal, protocol_v2(scope["path"]))
                return
        await self.app(scope, receive, send)

    def _gated(self, path: str) -> bool:
        return path == self.path or (path.startswith("/v2/models/") and path.endswith("/infer"))

    @staticmethod
    def _key_accepted(scope: Scope) -> bool:
        try:
            check_api_key(Request(scope), "inspect")
        except Unauthorized:
            return False
        return True


async def _send_refusal(send: Send, refusal: Overloaded, v2: bool) -> None:
    body = error_body(refusal.code, refusal.message, v2=v2)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(refusal.retry_after_s).encode()),
    ]
    await send({"type": "http.response.start", "status": status_of(refusal), "headers": headers})
    await send({"type": "http.response.body", "body": body})
