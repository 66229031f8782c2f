"""HTTP endpoints of the inspection records (admin key): search them, read one request's images, fetch an archived
image. The store is ``app.state.records`` (None while ``records.enabled`` is off: every route answers 404
``records_disabled``). The response models live here, next to their only router, rather than in schemas.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response
from pydantic import BaseModel, Field

from service.core.errors import InvalidQuery, NotFound, RecordsDisabled
from service.core.results import Detection
from service.http.deps import AdminAuthDep
from service.http.schemas import ErrorBody
from service.records.query import ImageLookup, QueryFilters, parse_time
from service.records.store import RecordStore

__all__ = [
    "IMAGE_RESPONSES",
    "TIME_FORMATS",
    "ArchivedFile",
    "FiltersDep",
    "InspectionImages",
    "InspectionPage",
    "RecordFields",
    "RecordedImage",
    "image_response",
    "records_router",
]

records_router = APIRouter(prefix="/v1/inspections", tags=["records"])
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "admin keys are configured and the request has none that is accepted"},
    404: {"model": ErrorBody, "description": "records are off (records_disabled), or nothing recorded there"},
    422: {"model": ErrorBody, "description": "a query parameter out of range, a bad time or cursor"},
}
TIME_FORMATS = "ISO 8601 (2024-06-10T08:00:00Z; no zone = UTC) or epoch seconds"


class ArchivedFile(BaseModel):
    """A file in the archive: ``path`` is relative to ``data_dir``; a file retention removed keeps its path, with
    ``deleted_at`` (epoch seconds) and ``deleted_reason`` (age or quota)."""

    kept: bool
    path: str | None
    deleted_at: float | None
    deleted_reason: str | None


class RecordFields(BaseModel):
    """What every record of one inspected image says, at the station and in the plant's central store
    (docs/records.md)."""

    request_id: str
    image_index: int
    received_at: float = Field(description="epoch seconds, UTC")
    camera_id: str | None
    part_id: str | None
    filename: str | None
    model_name: str
    model_version: str
    model_hash: str = Field(description="sha256 (prefix) of the bundle's bundle.json")
    backend: str
    precision: str
    verdict: Literal["OK", "NG"]
    detections: list[Detection]
    timings_ms: dict[str, float]
    width: int
    height: int
    image_sha256: str
    image_bytes: int = Field(description="size of the upload")
    tiled: bool
    tiles: int


class RecordedImage(RecordFields):
    """The record of one inspected image in this station's records (docs/records.md)."""

    seq: int = Field(description="position in the record log (increasing)")
    station_id: str | None = Field(default=None, description="the station that inspected it (setting station_id)")
    line_id: str | None = Field(default=None, description="its production line (setting line_id)")
    image: ArchivedFile = Field(description="the uploaded image, when archived")
    annotated: ArchivedFile = Field(description="the copy with the detections drawn, when archived")


class InspectionPage(BaseModel):
    """One page, newest first; pass ``next_cursor`` back as ``cursor`` for the next (null on the last page)."""

    items: list[RecordedImage]
    next_cursor: str | None


class InspectionImages(BaseModel):
    request_id: str
    images: list[RecordedImage] = Field(description="every image recorded under the id, by image index")


async def get_records(request: Request) -> RecordStore:
    store: RecordStore | None = getattr(request.app.state, "records", None)
    if store is None:
        raise RecordsDisabled("inspection records are off (setting records.enabled): nothing is recorded or served")
    return store


RecordsDep = Annotated[RecordStore, Depends(get_records)]


async def record_filters(
    camera_id: Annotated[str | None, Query(max_length=128)] = None,
    part_id: Annotated[str | None, Query(max_length=128)] = None,
    verdict: Literal["OK", "NG"] | None = None,
    class_name: Annotated[str | None, Query(max_length=128, description="images with a detection of it")] = None,
    since: Annotated[str | None, Query(max_length=64, description=f"received at or after; {TIME_FORMATS}")] = None,
    until: Annotated[str | None, Query(max_length=64, description=f"received before; {TIME_FORMATS}")] = None,
) -> QueryFilters:
    """The record filters of a search, station or plant (all together)."""
    return QueryFilters(camera_id, part_id, verdict, class_name, query_time("since", since), query_time("until", until))


FiltersDep = Annotated[QueryFilters, Depends(record_filters)]


def query_time(name: str, value: str | None) -> float | None:
    """A time query parameter in epoch seconds (None when absent).

    Raises:
        InvalidQuery: naming the parameter.
    """
    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError as exc:
        raise InvalidQuery(f"{name}: {exc}") from None


@records_router.get("", response_model=InspectionPage, responses=_ERRORS, summary="Search the inspection records")
async def list_inspections(
    _auth: AdminAuthDep,
    store: RecordsDep,
    filters: FiltersDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=64, description="next_cursor of the previous page")] = None,
) -> InspectionPage:
    """Records newest first, filtered (all filters together), keyset-paginated: rows recorded while paging never
    shift a page."""
    try:
        items, next_cursor = await store.query(filters, limit, cursor)
    except ValueError as exc:
        raise InvalidQuery(f"cursor: {exc}") from None
    return InspectionPage.model_validate({"items": items, "next_cursor": next_cursor})


@records_router.get("/{request_id}", response_model=InspectionImages, responses=_ERRORS, summary="One request")
async def get_inspection(
    _auth: AdminAuthDep, store: RecordsDep, request_id: Annotated[str, PathParam(max_length=128)]
) -> InspectionImages:
    """Every image recorded under ``request_id`` (the X-Request-ID of the inspection, or the id it was given)."""
    images = await store.get(request_id)
    if not images:
        raise NotFound(f"no inspection recorded under request id {request_id!r}")
    return InspectionImages.model_validate({"request_id": request_id, "images": images})


_IMAGE_TYPES = ("image/jpeg", "image/png", "image/bmp", "image/tiff", "application/octet-stream")
IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in _IMAGE_TYPES},
        "description": "the archived bytes (as uploaded), or the annotated JPEG",
    },
    **_ERRORS,
}


def _why_not(request_id: str, index: int, annotated: bool, found: ImageLookup) -> str:
    what = f"{'annotated copy of ' if annotated else ''}image {index} of request {request_id!r}"
    if found.reason == "no_record":
        return f"no image {index} recorded under request id {request_id!r}"
    if found.reason == "not_archived":
        rule = "records.archive.annotated" if annotated else "records.archive.ng / records.archive.ok_sample_rate"
        return f"the {what} was not archived (settings {rule})"
    if found.reason == "deleted":
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(found.deleted_at or 0.0))
        setting = "retention_days" if found.deleted_reason == "age" else "max_bytes"
        return f"the {what} was deleted by retention ({found.deleted_reason}, records.archive.{setting}) at {when}"
    return f"the {what} is recorded as kept but its file is missing (run `aoi records check`)"


@records_router.get(
    "/{request_id}/images/{index}",
    response_class=Response,
    responses=IMAGE_RESPONSES,
    summary="An archived image of a request",
)
async def get_inspection_image(
    _auth: AdminAuthDep,
    store: RecordsDep,
    request_id: Annotated[str, PathParam(max_length=128)],
    index: Annotated[int, PathParam(ge=0, le=1_000_000)],
    annotated: Annotated[bool, Query(description="the JPEG with the detections drawn")] = False,
) -> Response:
    """The image as uploaded (content type from its bytes), or with ``annotated=true`` the copy with the boxes
    drawn; 404 says why there is none (not archived, or deleted by retention and when)."""
    return await image_response(store, request_id, index, annotated)


async def image_response(store: RecordStore, request_id: str, index: int, annotated: bool = False) -> Response:
    """The archived bytes of one image (the record route's and the review page's).

    Raises:
        NotFound: saying why there is none (not archived, deleted by retention and when, missing).
    """
    found = await store.image_file(request_id, index, annotated)
    if found.path is None:
        raise NotFound(_why_not(request_id, index, annotated, found))
    try:
        data = await asyncio.to_thread(found.path.read_bytes)
    except FileNotFoundError:  # retention removed it between the lookup and the read
        raise NotFound(f"image {index} of request {request_id!r} was deleted by retention just now") from None
    return Response(data, media_type=found.media_type)
