"""Domain exceptions of the service and the single place where they become HTTP responses.

Code below the routes raises these; :func:`install_exception_handlers` maps each to its status code and the
``ErrorBody {code, message, request_id}`` JSON. Tracebacks go to the log, never to the client.
:func:`format_validation_error` words every validation failure the same way (settings, bundle.json, requests).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from service.inference.metrics import StageObserver

__all__ = [
    "BackendFailure",
    "BackendUnavailable",
    "BadRequest",
    "ClientGone",
    "DeadlineExceeded",
    "DecodeBusy",
    "EmptyBody",
    "ImageError",
    "ImageTooLarge",
    "ImageTooThin",
    "InvalidImage",
    "InvalidQuery",
    "MemoryBusy",
    "NotFound",
    "NotReady",
    "Overloaded",
    "PayloadTooLarge",
    "RecordsDisabled",
    "RecordsUnavailable",
    "RequestTooCostly",
    "ServiceError",
    "ShuttingDown",
    "SwapInProgress",
    "SwapRefused",
    "TooManyTiles",
    "TruncatedImage",
    "Unauthorized",
    "UnsupportedMediaType",
    "WouldMissDeadline",
    "ZeroSizeImage",
    "format_validation_error",
    "install_exception_handlers",
]

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of every error the client may see. ``status`` is the HTTP code, ``code`` the machine-readable name and
    ``reason`` the ``aoi_requests_*_total`` label (None: not counted as a rejection)."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    reason: ClassVar[str | None] = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class EmptyBody(ServiceError):
    status, code, reason = 400, "empty_body", "empty_body"


class UnsupportedMediaType(ServiceError):
    status, code, reason = 415, "unsupported_media_type", "unsupported_media_type"


class PayloadTooLarge(ServiceError):
    status, code, reason = 413, "payload_too_large", "payload_too_large"


class ImageError(ServiceError):
    """Base of the problems found while decoding one image (raised by :mod:`service.core.preprocess`)."""

    status, code, reason = 422, "invalid_image", "invalid_image"


class InvalidImage(ImageError):
    """The bytes are not an image in a supported format (JPEG, PNG, BMP, TIFF)."""


class TruncatedImage(ImageError):
    code = "truncated_image"


class ZeroSizeImage(ImageError):
    code = "zero_size_image"


class ImageTooThin(ImageError):
    """A frame so thin that its tiles would be mostly padding (a 1-pixel strip cut into hundreds of tiles): refused
    from the header, so a tiny upload cannot cost hundreds of model inputs."""

    code = "image_too_thin"


class ImageTooLarge(ImageError):
    """Width x height over the pixel limit (decompression-bomb guard); detected from the header before decoding."""

    status, code, reason = 413, "image_too_large", "image_too_large"


class Unauthorized(ServiceError):
    """No API key, or one that is not accepted for this route (only when keys are configured)."""

    status, code, reason = 401, "unauthorized", "unauthorized"


class TooManyTiles(ServiceError):
    """A frame or a request would need more model inputs (tiles) than the limits allow; found from the headers,
    before decoding."""

    status, code, reason = 413, "too_many_tiles", "too_many_tiles"


class Overloaded(ServiceError):
    """The batch queue is full; the client should retry after ``retry_after_s``."""

    status, code, reason = 503, "overloaded", "queue_full"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTooCostly(ServiceError):
    """A request over a per-request budget (total pixels, images, decode time); each message names the setting."""

    status, code, reason = 413, "request_too_costly", "request_too_costly"


class DecodeBusy(Overloaded):
    """The decode stage already holds as many admitted images as it may (setting ``decode_queue_images``)."""

    reason = "decode_full"


class ShuttingDown(Overloaded):
    """SIGTERM: the service answers what it admitted and takes nothing new (retry on another instance)."""

    code, reason = "shutting_down", "shutting_down"


class MemoryBusy(Overloaded):
    """Admitted requests already hold as many decoded pixels as they may (setting ``max_inflight_pixels``)."""

    reason = "memory_full"


class WouldMissDeadline(Overloaded):
    """The backlog ahead of the request would keep it past its deadline: refused now instead of a 504 later."""

    reason = "deadline"


class ClientGone(ServiceError):
    """The client closed the connection before the answer; its remaining work was dropped (nobody reads this)."""

    status, code, reason = 499, "client_closed_request", "client_gone"


class NotReady(ServiceError):
    status, code = 503, "not_ready"


class DeadlineExceeded(ServiceError):
    status, code = 504, "deadline_exceeded"


class BackendFailure(ServiceError):
    status, code, reason = 500, "backend_error", "backend_error"


class PostprocessFailure(ServiceError):
    """Post-processing raised on a batch (a bug on our side, not the backend's): that batch's requests fail."""

    status, code = 500, "internal_error"


class SwapRefused(ServiceError):
    """A new bundle failed a check of the live swap (path, hashes, backend, warm-up, smoke); the old one serves."""

    status, code = 422, "bundle_refused"


class SwapInProgress(ServiceError):
    status, code = 409, "swap_in_progress"


class NotFound(ServiceError):
    """The thing a path names does not exist (an inspection, one of its images); the message says which."""

    status, code = 404, "not_found"


class RecordsDisabled(NotFound):
    """The record routes were called while records are off (setting ``records.enabled``)."""

    code = "records_disabled"


class InvalidQuery(ServiceError):
    """A query parameter FastAPI cannot check by type: a time that is not ISO 8601 or epoch seconds, a bad cursor."""

    status, code = 422, "invalid_query"


class RecordsUnavailable(ServiceError):
    """The inspection record could not be written (disk full or slow, too many pending) and ``records.on_failure``
    is ``refuse``: the answer is withheld rather than given without its record. The message names the cause."""

    status, code, reason = 503, "records_unavailable", "records_unavailable"


class BackendUnavailable(Exception):
    """A backend cannot run on this machine (no GPU, missing package, CUDA fallback). A startup error, never HTTP."""


class _ValidationErrors(Protocol):
    """pydantic's ``ValidationError`` and FastAPI's ``RequestValidationError`` both list their errors so."""

    def errors(self) -> Sequence[Any]: ...


def format_validation_error(exc: _ValidationErrors) -> str:
    """Every error as ``loc: msg`` (``a.b: Field required``; ``(root)`` for the whole object), joined by ``; ``.
    The one formatter of settings, ``bundle.json`` and request-validation messages."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors())


def install_exception_handlers(app: FastAPI, metrics: StageObserver | None = None) -> None:
    """Register the handlers that turn :class:`ServiceError`, request-validation errors and anything unexpected into
    ``ErrorBody`` JSON responses carrying the request id; rejections and unexpected failures are told to ``metrics``."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from service.inference.metrics import StageObserver
    from service.log_config import request_id_var

    observer = metrics if metrics is not None else StageObserver()

    def _body(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        rid = request_id_var.get()
        return JSONResponse(
            status_code=status, content={"code": code, "message": message, "request_id": rid}, headers=headers
        )

    async def on_service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        observer.request_rejected(exc.reason)
        if exc.status >= 500:
            logger.warning("%s %s -> %d %s: %s", request.method, request.url.path, exc.status, exc.code, exc.message)
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, Overloaded) else None
        if isinstance(exc, PayloadTooLarge):  # the body was not (all) read: end the connection after the answer
            headers = {"Connection": "close"}
        if isinstance(exc, Unauthorized):
            headers = {"WWW-Authenticate": 'Bearer realm="aoi-inspect"'}
        return _body(exc.status, exc.code, exc.message, headers)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _body(422, "invalid_request", format_validation_error(exc) or "invalid request")

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _body(exc.status_code, code, str(exc.detail), dict(exc.headers or {}) or None)  # 405 keeps Allow

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        observer.request_failed("internal_error")
        return _body(500, "internal_error", f"internal error ({type(exc).__name__}); see the service log")

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
