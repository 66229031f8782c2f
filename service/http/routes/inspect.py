"""HTTP endpoints: inspection, model info, liveness/readiness (plus the KServe v2 aliases)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import Receive

from service.core.errors import (
    BadRequest,
    ClientGone,
    EmptyBody,
    PayloadTooLarge,
    RequestTooCostly,
    UnsupportedMediaType,
)
from service.core.preprocess import SUPPORTED_MEDIA_TYPES
from service.core.results import InspectResult
from service.http.deps import InspectServiceDep
from service.http.schemas import ErrorBody, InspectBatchResponse
from service.inference.pipeline import ImageUpload
from service.log_config import new_request_id, request_id_var

__all__ = ["read_body", "router", "unless_client_leaves"]

router = APIRouter()
_T = TypeVar("_T")
_ALIASES = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "image/x-ms-bmp": "image/bmp",
    "image/x-bmp": "image/bmp",
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "empty body or malformed multipart",
        401: "API keys are configured and the request has none that is accepted (WWW-Authenticate header)",
        413: "body over max_upload_bytes, image over max_image_pixels, request over max_request_pixels, "
        "max_images_per_request or max_decode_ms, or more tiles than tiling.max_tiles_* or queue_size",
        415: "unsupported content type",
        422: "not an image, truncated or zero-size image",
        503: "not ready, or busy: decode stage or queue full, or the backlog would miss the deadline (Retry-After)",
        504: "deadline passed",
        500: "backend failure (only that batch's requests)",
    }.items()
}
_IMAGE_BODY = {"content": {t: {"schema": {"type": "string", "format": "binary"}} for t in SUPPORTED_MEDIA_TYPES}}
_MULTIPART_BODY = {
    "multipart/form-data": {
        "schema": {
            "type": "object",
            "properties": {"images": {"type": "array", "items": {"type": "string", "format": "binary"}}},
            "required": ["images"],
        }
    }
}


def _media_type(header: str | None) -> str:
    mt = (header or "").split(";", 1)[0].strip().lower()
    return _ALIASES.get(mt, mt)


# An over-limit body is read on (and dropped) up to this much before the 413 goes out with ``Connection: close``, so
# a client still sending sees the 413 instead of a connection reset; past it the connection is closed anyway.
_DRAIN_BYTES = 64 * 1024 * 1024
_DRAIN_SECONDS = 5.0


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    dropped, t_end = 0, time.monotonic() + _DRAIN_SECONDS
    async for chunk in chunks:
        dropped += len(chunk)
        if dropped > _DRAIN_BYTES or time.monotonic() > t_end:
            return


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    stream = request.stream()
    if declared.isdigit() and int(declared) > limit:
        await _drain(stream)
        raise PayloadTooLarge(f"body is {declared} bytes, over the limit of {limit} (max_upload_bytes)")
    chunks, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            await _drain(stream)
            raise PayloadTooLarge(f"body is over the limit of {limit} bytes (max_upload_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _once(body: bytes) -> AsyncGenerator[bytes, None]:
    yield body


async def _multipart_images(request: Request, body: bytes, max_files: int) -> list[ImageUpload]:
    parser = MultiPartParser(request.headers, _once(body), max_files=max_files, max_fields=100)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith("Too many files"):
            raise RequestTooCostly(
                f"more than {max_files} images in one request (setting max_images_per_request)"
            ) from exc
        raise BadRequest(f"malformed multipart body: {exc.message}") from exc
    parts = form.getlist("images")
    if not parts:
        raise BadRequest("multipart body has no 'images' part; send each image as a file part named 'images'")
    uploads = []
    for i, part in enumerate(parts):
        if not isinstance(part, UploadFile):
            raise BadRequest(f"images part {i} is a text field; send the image bytes as a file part")
        name = part.filename or f"#{i}"
        mt = _media_type(part.content_type)
        if mt not in SUPPORTED_MEDIA_TYPES and mt not in ("", "application/octet-stream"):
            raise UnsupportedMediaType(
                f"image {name}: content type {mt!r} is not one of {', '.join(SUPPORTED_MEDIA_TYPES)}"
            )
        data = await part.read()
        if not data:
            raise EmptyBody(f"image {name} is empty")
        uploads.append(ImageUpload(data, part.filename))
    await form.close()
    return uploads


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass  # after the body, the server sends nothing but the disconnect


async def unless_client_leaves(request: Request, work: Coroutine[Any, Any, _T]) -> _T:
    """Run ``work`` (the body is read already) while listening for the client closing the connection: then its
    images not yet decoded or batched are dropped instead of computed for nobody (ClientGone, 499, never read)."""
    current = asyncio.current_task()
    assert current is not None
    left = False

    def _client_left(watch: asyncio.Task[None]) -> None:
        nonlocal left
        if not watch.cancelled() and watch.exception() is None:
            left = True
            current.cancel()

    # The work runs in this task (no second task per request); a watcher cancels it if the client disconnects.
    watch = asyncio.ensure_future(_disconnected(request.receive))
    watch.add_done_callback(_client_left)
    try:
        return await work
    except asyncio.CancelledError:
        if left:
            current.uncancel()
            raise ClientGone("the client closed the connection before the answer; its work was dropped") from None
        raise
    finally:
        watch.remove_done_callback(_client_left)
        watch.cancel()


@router.post(
    "/v1/inspect",
    tags=["inspection"],
    response_model=InspectResult | InspectBatchResponse,
    responses=_ERRORS,
    openapi_extra={"requestBody": {"required": True, "content": {**_IMAGE_BODY["content"], **_MULTIPART_BODY}}},
    summary="Inspect one image (raw body) or several (multipart field 'images')",
)
async def inspect(
    request: Request,
    service: InspectServiceDep,
    camera_id: Annotated[str | None, Query(max_length=128)] = None,
    part_id: Annotated[str | None, Query(max_length=128)] = None,
    tiling: Annotated[
        Literal["auto", "on", "off"] | None,
        Query(description="auto: tile frames larger than the model's native field (the default); on; off"),
    ] = None,
) -> Response:
    """Raw body (``image/jpeg``, ``image/png``, ``image/bmp``, ``image/tiff``) returns one result; multipart returns
    ``{request_id, results: [...]}`` in part order. Detections are in original-image pixels."""
    arrival = time.monotonic()
    mt = _media_type(request.headers.get("content-type"))
    multipart = mt == "multipart/form-data"
    if not multipart and mt not in SUPPORTED_MEDIA_TYPES:
        raise UnsupportedMediaType(
            f"content type {mt or '(none)'!r} is not supported; send {', '.join(SUPPORTED_MEDIA_TYPES)} "
            "as the raw body, or multipart/form-data with 'images' parts"
        )
    settings = service.settings
    body = await read_body(request, settings.max_upload_bytes)
    if not body:
        raise EmptyBody("request body is empty; send the image bytes")
    uploads = (
        await _multipart_images(request, body, settings.max_images_per_request) if multipart else [ImageUpload(body)]
    )
    rid = request_id_var.get() or new_request_id()
    work = service.inspect(
        uploads, request_id=rid, arrival=arrival, camera_id=camera_id, part_id=part_id, tiling=tiling
    )
    results = await unless_client_leaves(request, work)
    payload = InspectBatchResponse(request_id=rid, results=results) if multipart else results[0]
    # Built from validated models already: serialise once here instead of FastAPI re-validating the response model.
    return Response(payload.model_dump_json(), media_type="application/json")
