"""The review API (docs/review.md): the queue of inspected images a reviewer works through, a decision per image
(confirm, false call, correct box by box, skip), its undo and history, the served bundle's classes, the archived
image, and the review session behind the page's cookie. Every route: ``review.enabled`` (else 404), then a reviewer
or admin key or a live session (:data:`~service.http.deps.ReviewerDep`); the records store is
``app.state.records`` (records off: 404 ``records_disabled``). The response models live here, next to their only
router.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from service.core.errors import NotReady, RecordsDisabled
from service.core.results import Detection
from service.http.auth import REVIEW_COOKIE, ReviewSessions, check_review_login
from service.http.deps import ReviewEnabledDep, ReviewerDep
from service.http.routes.records import IMAGE_RESPONSES, TIME_FORMATS, RecordsDep, image_response, query_time
from service.http.schemas import ErrorBody
from service.records.query import QueryFilters
from service.records.reviews import Decision, ReviewStore

__all__ = ["ReviewDecision", "ReviewQueuePage", "review_router"]

review_router = APIRouter(tags=["review"])

_401 = "reviewer or admin keys are configured and the request has neither an accepted key nor a live review session"
_403 = "no reviewer or admin keys are configured and the caller is not local (loopback only)"
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "a JSON body that could not be parsed at all (bad_request)"},
    401: {"model": ErrorBody, "description": _401},
    403: {"model": ErrorBody, "description": _403},
    404: {"model": ErrorBody, "description": "review or records are off, or no such recorded image"},
    422: {"model": ErrorBody, "description": "a parameter or body out of range, or a decision that does not fit"},
}
_NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorBody, "description": "the model is still loading (its classes are not known yet)"}
}
_NAME = r"^[^\x00-\x1f\x7f]+$"  # a reviewer's name: no control characters
Index = Annotated[int, PathParam(ge=0, le=1_000_000)]
RequestId = Annotated[str, PathParam(max_length=128)]


class ReviewBox(BaseModel):
    """A box as the reviewer judged it, in original image pixels (docs/review.md, "Reviewed boxes")."""

    box_xyxy: tuple[float, float, float, float]
    class_id: int
    class_name: str
    status: Literal["confirmed", "false_call", "relabelled", "added"]
    score: float | None = Field(description="the model's; null for an added box")
    detection_ordinal: int | None = Field(description="index into the record's detections; null for an added box")
    original_class_id: int | None = Field(description="the model's class of a relabelled box")


class ReviewDecision(BaseModel):
    """One decision (or undo: ``undoes`` names the review_seq it took back)."""

    review_seq: int
    decision: Literal["confirmed", "false_call", "corrected", "skipped", "undo"]
    boxes: list[ReviewBox]
    reviewer: str
    decided_at: float = Field(description="epoch seconds, UTC")
    model_version: str = Field(description="of the inspection it judged")
    undoes: int | None = None


class BoxInput(BaseModel):
    """A box of a ``corrected`` decision: a model detection by ``detection_ordinal`` (status confirmed, false_call or
    relabelled; a relabelled one with its new ``class_id``, optionally a redrawn ``box_xyxy``), or one the reviewer
    drew (status added, ``box_xyxy`` and ``class_id``, no ordinal). Other fields are filled by the server (class
    names from the bundle, the model's box and score from the record); given back as received they are ignored."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["confirmed", "false_call", "relabelled", "added"]
    detection_ordinal: int | None = Field(default=None, ge=0, le=1_000_000)
    class_id: int | None = Field(default=None, ge=0, le=1_000_000)
    box_xyxy: tuple[float, float, float, float] | None = None
    class_name: str | None = Field(default=None, max_length=256)
    score: float | None = None
    original_class_id: int | None = None


class DecisionInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: Literal["confirmed", "false_call", "corrected", "skipped"]
    boxes: list[BoxInput] = Field(default_factory=list, max_length=1000, description="corrected only")
    reviewer: str | None = Field(
        default=None, min_length=1, max_length=100, pattern=_NAME, description="recorded reviewer (a session's wins)"
    )


class QueueItem(BaseModel):
    seq: int
    request_id: str
    image_index: int
    received_at: float = Field(description="epoch seconds, UTC")
    camera_id: str | None
    part_id: str | None
    verdict: Literal["OK", "NG"]
    model_name: str
    model_version: str
    width: int
    height: int
    detections: list[Detection]
    image_url: str = Field(description="the archived image (GET, same auth)")
    image_kept: bool = Field(description="false: the image was not archived or retention deleted it")
    review: ReviewDecision | None = Field(description="the current decision; null when none")


class ReviewQueuePage(BaseModel):
    items: list[QueueItem] = Field(description="newest first")
    next_before_seq: int | None = Field(description="pass as before_seq for the next page; null on the last")
    total_unreviewed: int = Field(description="images matching the filters (status aside) without a decision")


class ReviewHistory(BaseModel):
    request_id: str
    image_index: int
    reviews: list[ReviewDecision] = Field(description="every decision and undo, newest first")


class ReviewClass(BaseModel):
    class_id: int
    class_name: str


class ReviewClasses(BaseModel):
    model_name: str
    model_version: str
    classes: list[ReviewClass]


class ReviewLogin(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(default="", max_length=1024, description="a reviewer or admin key (none configured: ignored)")
    reviewer: str = Field(min_length=1, max_length=100, pattern=_NAME, description="your name")


async def get_reviews(store: RecordsDep) -> ReviewStore:
    if store.reviews is None:
        raise RecordsDisabled("the records store is not running: no review decisions can be read or written")
    return store.reviews


ReviewsDep = Annotated[ReviewStore, Depends(get_reviews)]


def _served(request: Request) -> tuple[str, str, list[str]]:
    """(model name, version, class names by id) of the served bundle.

    Raises:
        NotReady: no model is loaded yet.
    """
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise NotReady("the model is still loading; its classes are known once /readyz says ready")
    bundle = service.model.bundle
    return bundle.name, bundle.version, list(bundle.classes)


def _decision(row: Decision) -> ReviewDecision:
    return ReviewDecision.model_validate(row.to_dict())


def image_url(request_id: str, index: int) -> str:
    """The review route of an archived image (the request id percent-encoded: ids are chosen by clients)."""
    return f"/v1/inspections/{quote(request_id, safe='')}/images/{index}/image"


# --- the session behind the page's cookie ----------------------------------------------------------------------------


def _cookie(request: Request, response: Response, token: str, max_age: int) -> None:
    response.set_cookie(
        REVIEW_COOKIE, token, max_age=max_age, path="/", httponly=True, samesite="strict",
        secure=request.url.scheme == "https",
    )  # fmt: skip


@review_router.post(
    "/review/session",
    status_code=204,
    response_class=Response,
    responses={**_ERRORS, 204: {"description": "signed in: the aoi_review cookie is set"}},
    summary="Sign in to review (sets the session cookie)",
)
async def open_session(request: Request, _on: ReviewEnabledDep, login: ReviewLogin) -> Response:
    """A review session for ``reviewer``: the ``aoi_review`` cookie (HttpOnly, SameSite=Strict, Path=/, Secure over
    https) the page's requests carry instead of a key; it ends after ``review.session_ttl_s``."""
    check_review_login(request, login.key)
    sessions: ReviewSessions = request.app.state.review_sessions
    response = Response(status_code=204)
    _cookie(request, response, sessions.open(login.reviewer.strip() or "local"), math.ceil(sessions.ttl_s))
    return response


@review_router.delete(
    "/review/session",
    status_code=204,
    response_class=Response,
    responses={404: _ERRORS[404], 204: {"description": "signed out: the session ended, the cookie is cleared"}},
    summary="Sign out of reviewing",
)
async def close_session(request: Request, _on: ReviewEnabledDep) -> Response:
    """End the cookie's session (if any) and clear the cookie."""
    token = request.cookies.get(REVIEW_COOKIE)
    if token:
        request.app.state.review_sessions.close(token)
    response = Response(status_code=204)
    _cookie(request, response, "", 0)
    return response


# --- the queue and the classes ---------------------------------------------------------------------------------------


async def queue_filters(
    camera_id: Annotated[str | None, Query(max_length=128)] = None,
    part_id: Annotated[str | None, Query(max_length=128)] = None,
    class_name: Annotated[str | None, Query(max_length=128, description="images with a detection of it")] = None,
    model_version: Annotated[str | None, Query(max_length=128)] = None,
    since: Annotated[str | None, Query(max_length=64, description=f"received at or after; {TIME_FORMATS}")] = None,
    until: Annotated[str | None, Query(max_length=64, description=f"received before; {TIME_FORMATS}")] = None,
    verdict: Annotated[Literal["NG", "OK", "any"], Query(description="the model's verdict")] = "NG",
    status: Annotated[
        Literal["unreviewed", "reviewed", "all"], Query(description="by current decision")
    ] = "unreviewed",
) -> QueryFilters:
    return QueryFilters(
        camera_id, part_id, None if verdict == "any" else verdict, class_name, query_time("since", since),
        query_time("until", until), model_version, None if status == "all" else status == "reviewed",
    )  # fmt: skip


@review_router.get(
    "/v1/review/queue", response_model=ReviewQueuePage, responses=_ERRORS, summary="The images to review"
)
async def review_queue(
    _who: ReviewerDep,
    reviews: ReviewsDep,
    filters: Annotated[QueryFilters, Depends(queue_filters)],
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    before_seq: Annotated[int | None, Query(ge=1, le=2**62, description="next_before_seq of the last page")] = None,
) -> ReviewQueuePage:
    """Recorded images newest first (NG and without a decision by default), with their detections, the URL of the
    archived image and the current decision; keyset-paginated on seq (decisions made meanwhile never shift a page)."""
    page = await reviews.queue(filters, limit, before_seq)
    items = []
    for doc in page.items:
        current = page.current.get(int(doc["seq"]))
        url = image_url(doc["request_id"], int(doc["image_index"]))
        review = _decision(current) if current is not None else None
        items.append(QueueItem.model_validate({**doc, "image_url": url, "image_kept": doc["image"]["kept"],
                                               "review": review}))  # fmt: skip
    return ReviewQueuePage(items=items, next_before_seq=page.next_before_seq, total_unreviewed=page.total_unreviewed)


@review_router.get(
    "/v1/review/classes",
    response_model=ReviewClasses,
    responses={**_ERRORS, **_NOT_READY},
    summary="The served bundle's classes",
)
async def review_classes(request: Request, _who: ReviewerDep) -> ReviewClasses:
    """The class ids and names a relabelled or added box may take (the served bundle's)."""
    name, version, classes = _served(request)
    return ReviewClasses(
        model_name=name, model_version=version,
        classes=[ReviewClass(class_id=i, class_name=c) for i, c in enumerate(classes)],
    )  # fmt: skip


# --- one image -------------------------------------------------------------------------------------------------------


@review_router.get(
    "/v1/inspections/{request_id}/images/{index}/image",
    response_class=Response,
    responses={**_ERRORS, 200: IMAGE_RESPONSES[200]},
    summary="An archived image, for the reviewer",
)
async def review_image(_who: ReviewerDep, store: RecordsDep, request_id: RequestId, index: Index) -> Response:
    """The image as uploaded (what ``GET /v1/inspections/{request_id}/images/{index}`` serves), with the review
    routes' auth (so the page's cookie session loads it); 404 says why there is none."""
    return await image_response(store, request_id, index)


@review_router.post(
    "/v1/inspections/{request_id}/images/{index}/review",
    status_code=201,
    response_model=ReviewDecision,
    responses={**_ERRORS, **_NOT_READY},
    summary="Decide on an image",
)
async def post_review(
    request: Request,
    who: ReviewerDep,
    reviews: ReviewsDep,
    request_id: RequestId,
    index: Index,
    body: Annotated[DecisionInput, Body()],
) -> ReviewDecision:
    """Record a decision on the image's newest record: ``confirmed`` (every model box a true defect), ``false_call``
    (none is), ``corrected`` (every model detection by ordinal, confirmed / false_call / relabelled, plus added boxes)
    or ``skipped``. Every decision is kept; the newest is current (two reviewers at once: both kept, the later
    wins)."""
    _, _, classes = _served(request)
    boxes = [b.model_dump(exclude_none=True) for b in body.boxes]
    row = await reviews.decide(request_id, index, body.decision, boxes, who.named(body.reviewer), classes)
    return _decision(row)


@review_router.delete(
    "/v1/inspections/{request_id}/images/{index}/review",
    response_model=ReviewDecision | None,
    responses=_ERRORS,
    summary="Undo the current decision",
)
async def undo_review(
    who: ReviewerDep,
    reviews: ReviewsDep,
    request_id: RequestId,
    index: Index,
    reviewer: Annotated[
        str | None, Query(min_length=1, max_length=100, pattern=_NAME, description="who undoes")
    ] = None,
) -> ReviewDecision | None:
    """Take back the image's current decision (an ``undo`` row in its history); answers the decision current now,
    or null. 404 when the image has no decision to undo."""
    current = await reviews.undo(request_id, index, who.named(reviewer))
    return _decision(current) if current is not None else None


@review_router.get(
    "/v1/inspections/{request_id}/images/{index}/reviews",
    response_model=ReviewHistory,
    responses=_ERRORS,
    summary="An image's review history",
)
async def review_history(_who: ReviewerDep, reviews: ReviewsDep, request_id: RequestId, index: Index) -> ReviewHistory:
    """Every decision and undo of the image's newest record, newest first."""
    rows = await reviews.history(request_id, index)
    return ReviewHistory(request_id=request_id, image_index=index, reviews=[_decision(r) for r in rows])
