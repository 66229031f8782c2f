"""The vocabulary of refusals and failures: one exception type per reason a request is refused or fails, raised by
whichever package finds it (core for an image, inference for load, records, lifecycle); :mod:`service.http.errors`
maps each to its status code and JSON. :func:`format_validation_error` words every validation failure the same way
(settings, bundle.json, requests)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

__all__ = [
    "BackendFailure",
    "BackendUnavailable",
    "BadRequest",
    "CentralDisabled",
    "CentralUnavailable",
    "ClientGone",
    "DeadlineExceeded",
    "DecodeBusy",
    "EmptyBody",
    "Forbidden",
    "ImageError",
    "ImageTooLarge",
    "ImageTooThin",
    "InvalidImage",
    "InvalidQuery",
    "InvalidReview",
    "MemoryBusy",
    "NotFound",
    "NotReady",
    "Overloaded",
    "PayloadTooLarge",
    "RecordsDisabled",
    "RecordsUnavailable",
    "RequestTooCostly",
    "ReviewDisabled",
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
]


class ServiceError(Exception):
    """Base of every error the client may see: ``code`` is the machine-readable name and ``reason`` the
    ``aoi_requests_*_total`` label (None: not counted as a rejection). Its HTTP status is
    :data:`service.http.errors.STATUS`'s business, the one map from these types to responses."""

    code: ClassVar[str] = "internal_error"
    reason: ClassVar[str | None] = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServiceError):
    code = "bad_request"


class EmptyBody(ServiceError):
    code, reason = "empty_body", "empty_body"


class UnsupportedMediaType(ServiceError):
    code, reason = "unsupported_media_type", "unsupported_media_type"


class PayloadTooLarge(ServiceError):
    code, reason = "payload_too_large", "payload_too_large"


class ImageError(ServiceError):
    """Base of the problems found while decoding one image (raised by :mod:`service.core.preprocess`)."""

    code, reason = "invalid_image", "invalid_image"


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

    code, reason = "image_too_large", "image_too_large"


class Unauthorized(ServiceError):
    """No API key, or one that is not accepted for this route (only when keys are configured)."""

    code, reason = "unauthorized", "unauthorized"


class Forbidden(ServiceError):
    """The caller may not use this route at all (no key would help from where it is): the admin routes while no admin
    keys are configured, from a caller that is not on loopback."""

    code, reason = "forbidden", "forbidden"


class TooManyTiles(ServiceError):
    """A frame or a request would need more model inputs (tiles) than the limits allow; found from the headers,
    before decoding."""

    code, reason = "too_many_tiles", "too_many_tiles"


class Overloaded(ServiceError):
    """The batch queue is full; the client should retry after ``retry_after_s``."""

    code, reason = "overloaded", "queue_full"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTooCostly(ServiceError):
    """A request over a per-request budget (total pixels, images, decode time); each message names the setting."""

    code, reason = "request_too_costly", "request_too_costly"


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

    code, reason = "client_closed_request", "client_gone"


class NotReady(ServiceError):
    code = "not_ready"


class DeadlineExceeded(ServiceError):
    code = "deadline_exceeded"


class BackendFailure(ServiceError):
    code, reason = "backend_error", "backend_error"


class PostprocessFailure(ServiceError):
    """Post-processing raised on a batch (a bug on our side, not the backend's): that batch's requests fail."""

    code = "internal_error"


class SwapRefused(ServiceError):
    """A new bundle failed a check of the live swap (path, hashes, backend, warm-up, smoke); the old one serves."""

    code = "bundle_refused"


class SwapInProgress(ServiceError):
    code = "swap_in_progress"


class NotFound(ServiceError):
    """The thing a path names does not exist (an inspection, one of its images); the message says which."""

    code = "not_found"


class RecordsDisabled(NotFound):
    """The record routes were called while records are off (setting ``records.enabled``)."""

    code = "records_disabled"


class InvalidQuery(ServiceError):
    """A query parameter FastAPI cannot check by type: a time that is not ISO 8601 or epoch seconds, a bad cursor."""

    code = "invalid_query"


class ReviewDisabled(NotFound):
    """The review page or API was called while reviews are off (setting ``review.enabled``)."""

    code = "review_disabled"


class InvalidReview(InvalidQuery):
    """A review decision that does not fit its record: a detection ordinal out of range or listed twice, a model
    detection left out of a correction, a class id the served bundle does not have, a box outside the image."""

    code = "invalid_review"


class RecordsUnavailable(ServiceError):
    """The inspection record could not be written (disk full or slow, too many pending) and ``records.on_failure``
    is ``refuse``: the answer is withheld rather than given without its record. The message names the cause."""

    code, reason = "records_unavailable", "records_unavailable"


class CentralDisabled(NotFound):
    """A plant-wide query while ``central`` is off: this station forwards to no central store."""

    code = "central_disabled"


class CentralUnavailable(ServiceError):
    """The central store did not answer a plant-wide query (down, unreachable, refused); the message says why
    without the DSN. The station itself is unaffected: its own records stay queryable."""

    code = "central_unavailable"


class BackendUnavailable(Exception):
    """A backend cannot run on this machine (no GPU, missing package, CUDA fallback). A startup error, never HTTP."""


class _ValidationErrors(Protocol):
    """pydantic's ``ValidationError`` and FastAPI's ``RequestValidationError`` both list their errors so."""

    def errors(self) -> Sequence[Any]: ...


def format_validation_error(exc: _ValidationErrors) -> str:
    """Every error as ``loc: msg`` (``a.b: Field required``; ``(root)`` for the whole object), joined by ``; ``.
    The one formatter of settings, ``bundle.json`` and request-validation messages."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors())
