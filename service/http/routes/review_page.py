"""The review page (issue 26, docs/review.md): ``GET /review`` the page, ``GET /review/login`` its log-in form,
``GET /review/public/{name}`` what the form needs (the stylesheet, the form's script) and ``GET /review/assets/{name}``
the page's script. Plain HTML, CSS and JS vendored in ``service/http/review_page/`` (package data: no build step, no
CDN, works offline beside the line); the page calls only the review API (:mod:`service.http.routes.review`).

Who may see it is who may review (:func:`service.http.auth.check_reviewer`, the check behind ``ReviewerDep``): a
reviewer or admin key or the ``aoi_review`` session cookie, or with no such keys configured a local caller. Only the
log-in form and its two files are open. A browser without a session asking for ``/review`` is sent to the form (303);
any other caller gets the 401 JSON error. Every file goes out with a Content-Security-Policy that allows this
origin's scripts and styles only (none inline: the page has none), no plugins, no framing, no base URL and no form
posting elsewhere, plus ``nosniff`` and ``no-referrer``. ``review.enabled`` off: everything here answers 404."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import RedirectResponse, Response

from service.core.errors import NotFound, Unauthorized
from service.http.auth import check_reviewer
from service.http.deps import ReviewEnabledDep, ReviewerDep

__all__ = ["CONTENT_SECURITY_POLICY", "PAGE_DIR", "SECURITY_HEADERS", "review_page_router"]

PAGE_DIR = Path(__file__).resolve().parents[1] / "review_page"
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",  # kept, but asked again each time (ETag): a new version shows on the next load
}
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
}
_PUBLIC = frozenset({"review.css", "login.js"})  # what the log-in form needs
_ASSETS = frozenset({"review.js"})  # what only a reviewer gets

review_page_router = APIRouter(tags=["review"], include_in_schema=False)


@dataclass(frozen=True)
class PageFile:
    body: bytes
    media_type: str
    etag: str


@cache
def page_file(name: str) -> PageFile:
    """A file of the page, read once (they change only with the package)."""
    body = (PAGE_DIR / name).read_bytes()
    return PageFile(body, _MEDIA_TYPES[Path(name).suffix], f'"{hashlib.sha256(body).hexdigest()[:20]}"')


def _send(request: Request, name: str) -> Response:
    """The file with the security headers; 304 when the browser's copy is current."""
    found = page_file(name)
    headers = {**SECURITY_HEADERS, "ETag": found.etag}
    if request.headers.get("if-none-match") == found.etag:
        return Response(status_code=304, headers=headers)
    return Response(found.body, media_type=found.media_type, headers=headers)


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


@review_page_router.get("/review")
async def review_page(request: Request, _on: ReviewEnabledDep) -> Response:
    """The page, to a reviewer; a browser without a session is sent to the log-in form, which comes back here with
    the same filters (``next``)."""
    try:
        check_reviewer(request)
    except Unauthorized:
        if not _wants_html(request):
            raise
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = {**SECURITY_HEADERS, "Cache-Control": "no-store"}
        return RedirectResponse(f"/review/login?next={quote(here, safe='')}", status_code=303, headers=headers)
    return _send(request, "index.html")


@review_page_router.get("/review/login")
async def review_login_page(request: Request, _on: ReviewEnabledDep) -> Response:
    """The log-in form (open to anyone: it holds nothing): reviewer name and key -> ``POST /review/session``."""
    return _send(request, "login.html")


@review_page_router.get("/review/public/{name}")
async def review_public_file(
    request: Request, _on: ReviewEnabledDep, name: Annotated[str, PathParam(max_length=64)]
) -> Response:
    """The stylesheet and the log-in form's script."""
    if name not in _PUBLIC:
        raise NotFound(f"no file {name!r} of the review page here")
    return _send(request, name)


@review_page_router.get("/review/assets/{name}")
async def review_asset(
    request: Request, _reviewer: ReviewerDep, name: Annotated[str, PathParam(max_length=64)]
) -> Response:
    """The page's script, to a reviewer."""
    if name not in _ASSETS:
        raise NotFound(f"no file {name!r} of the review page here")
    return _send(request, name)
