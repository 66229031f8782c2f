"""The one map from the service's error types (:mod:`service.core.errors`) to HTTP: :data:`STATUS` gives each its
status code, :func:`error_response` its ``ErrorBody {code, message, request_id}`` JSON and headers (on the Open
Inference Protocol's ``/v2`` routes the protocol's ``{"error": message}``, same status codes), and
:func:`install_exception_handlers` registers them on the app. Tracebacks go to the log, never to the client."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.core.errors import (
    BackendFailure,
    BadRequest,
    CentralUnavailable,
    ClientGone,
    DeadlineExceeded,
    EmptyBody,
    Forbidden,
    ImageError,
    ImageTooLarge,
    InvalidQuery,
    NotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    PostprocessFailure,
    RecordsUnavailable,
    RequestTooCostly,
    ServiceError,
    SwapInProgress,
    SwapRefused,
    TooManyTiles,
    Unauthorized,
    UnsupportedMediaType,
    format_validation_error,
)
from service.inference.metrics import StageObserver
from service.log_config import request_id_var

if TYPE_CHECKING:
    from fastapi import FastAPI, Request

__all__ = ["STATUS", "error_body", "error_response", "install_exception_handlers", "protocol_v2", "status_of"]

logger = logging.getLogger(__name__)

# Error type -> HTTP status. A subclass without an entry takes its nearest listed base's (DecodeBusy -> Overloaded).
STATUS: dict[type[ServiceError], int] = {
    ServiceError: 500,
    BadRequest: 400,
    EmptyBody: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    SwapInProgress: 409,
    PayloadTooLarge: 413,
    ImageTooLarge: 413,
    TooManyTiles: 413,
    RequestTooCostly: 413,
    UnsupportedMediaType: 415,
    ImageError: 422,
    SwapRefused: 422,
    InvalidQuery: 422,
    ClientGone: 499,
    BackendFailure: 500,
    PostprocessFailure: 500,
    Overloaded: 503,
    NotReady: 503,
    RecordsUnavailable: 503,
    CentralUnavailable: 503,
    DeadlineExceeded: 504,
}


def status_of(exc: ServiceError) -> int:
    """The HTTP status of ``exc``: its own type's entry in :data:`STATUS`, else its nearest base's."""
    for cls in type(exc).__mro__:
        status = STATUS.get(cls)
        if status is not None:
            return status
    return 500


def error_headers(exc: ServiceError) -> dict[str, str] | None:
    """Headers an error's answer carries: ``Retry-After`` on overload, ``Connection: close`` when the body was not
    (all) read, the auth challenge on 401."""
    if isinstance(exc, Overloaded):
        return {"Retry-After": str(exc.retry_after_s)}
    if isinstance(exc, PayloadTooLarge):
        return {"Connection": "close"}
    if isinstance(exc, Unauthorized):
        return {"WWW-Authenticate": 'Bearer realm="aoi-inspect"'}
    return None


def protocol_v2(path: str) -> bool:
    """Whether ``path`` is one of the Open Inference Protocol's (``/v2``...): its errors are ``{"error": message}``
    (the request id stays in the ``X-Request-ID`` header), with the same status codes."""
    return path == "/v2" or path.startswith("/v2/")


def _error_content(code: str, message: str, v2: bool) -> dict[str, str | None]:
    return {"error": message} if v2 else {"code": code, "message": message, "request_id": request_id_var.get()}


def error_body(code: str, message: str, *, v2: bool = False) -> bytes:
    """``ErrorBody`` JSON with the current request id (``v2``: the protocol's ``{"error": message}``)."""
    return json.dumps(_error_content(code, message, v2)).encode()


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, *, v2: bool = False
) -> JSONResponse:
    return JSONResponse(status_code=status, content=_error_content(code, message, v2), headers=headers)


def install_exception_handlers(app: FastAPI, metrics: StageObserver | None = None) -> None:
    """Register the handlers that turn :class:`ServiceError`, request-validation errors and anything unexpected into
    ``ErrorBody`` JSON responses carrying the request id; rejections and unexpected failures are told to ``metrics``."""
    observer = metrics if metrics is not None else StageObserver()

    async def on_service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        observer.request_rejected(exc.reason)
        status = status_of(exc)
        if status >= 500:
            logger.warning("%s %s -> %d %s: %s", request.method, request.url.path, status, exc.code, exc.message)
        return error_response(status, exc.code, exc.message, error_headers(exc), v2=protocol_v2(request.url.path))

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message = format_validation_error(exc) or "invalid request"
        return error_response(422, "invalid_request", message, v2=protocol_v2(request.url.path))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        # 400: FastAPI could not parse a JSON body at all (nested too deep, not text); 422 is for a parsed one
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {}) or None  # 405: Allow
        return error_response(exc.status_code, code, str(exc.detail), headers, v2=protocol_v2(request.url.path))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        observer.request_failed("internal_error")
        message = f"internal error ({type(exc).__name__}); see the service log"
        return error_response(500, "internal_error", message, v2=protocol_v2(request.url.path))

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
