"""API keys (settings ``auth``): the one check of a presented key, used by the route dependencies
(:mod:`service.http.deps`) and by the admission gate (:mod:`service.inference.admission`); who may use the admin
routes while no admin key is configured (callers on loopback only, :func:`check_admin_access`); and who reviews
(:func:`check_reviewer`: a reviewer or admin key, or the session cookie of :class:`ReviewSessions`, docs/review.md)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from starlette.requests import Request

from service.core.errors import Forbidden, Unauthorized

__all__ = [
    "FORWARDING_HEADERS",
    "REVIEW_COOKIE",
    "AdminAccess",
    "ReviewSessions",
    "Reviewer",
    "admin_access",
    "admin_access_note",
    "check_admin_access",
    "check_api_key",
    "check_review_login",
    "check_reviewer",
]

REVIEW_COOKIE = "aoi_review"

AdminAccess = Literal["key_required", "loopback_only"]
# Headers a proxy adds when it relays a request for someone else: such a request is not a local caller's.
FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


def _presented(request: Request) -> bytes:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip().encode()
    return request.headers.get("x-api-key", "").strip().encode()


def check_api_key(request: Request, scope: Literal["inspect", "admin"]) -> None:
    """Pass when no keys are configured for ``scope`` or the request presents one (``Authorization: Bearer`` or
    ``X-API-Key``); every key is compared, in constant time, so the time taken does not say which one is close.

    Raises:
        Unauthorized: 401; the message never repeats what was presented.
    """
    keys: tuple[bytes, ...] = request.app.state.api_keys[scope]
    if not keys:
        return
    presented = _presented(request)
    accepted = False
    for key in keys:
        accepted |= hmac.compare_digest(key, presented)
    if not accepted:
        what = "no API key" if not presented else "an API key that is not accepted here"
        raise Unauthorized(f"{request.url.path} needs an API key ({scope}): got {what}; send Authorization: Bearer "
                           "<key> or X-API-Key: <key>")  # fmt: skip


def admin_access(admin_keys: tuple[bytes, ...]) -> AdminAccess:
    """How the admin routes are guarded: by the admin keys when there are any, else open to loopback callers only."""
    return "key_required" if admin_keys else "loopback_only"


def _not_local(request: Request) -> str | None:
    """Why the caller is not local, or None when it is: the connection's peer address (``request.client``, the TCP
    peer: forwarding headers are never believed) is loopback (127.0.0.0/8, ::1) and no proxy says it relayed the
    request for someone else (any of :data:`FORWARDING_HEADERS` present)."""
    relayed = [h for h in FORWARDING_HEADERS if h in request.headers]
    if relayed:
        return f"it was relayed by a proxy ({relayed[0]} header)"
    host = request.client.host if request.client is not None else ""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 scope (fe80::1%eth0) is no loopback
    except ValueError:
        return f"it came from {host or 'an unknown address'}, not from loopback"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 on a dual-stack socket
    return None if address.is_loopback else f"it came from {host}, not from loopback"


def check_admin_access(request: Request) -> None:
    """The admin routes (``/v1/admin/*``: swap, rollback): with admin keys configured, an accepted key from anywhere
    (:func:`check_api_key`); without, only a local caller (:func:`_not_local`) and no key is asked for.

    Raises:
        Unauthorized: 401, keys configured and none accepted presented.
        Forbidden: 403, no keys configured and the caller is not local.
    """
    if request.app.state.api_keys["admin"]:
        check_api_key(request, "admin")
        return
    why = _not_local(request)
    if why is not None:
        raise Forbidden(f"{request.url.path} answers loopback callers only while no admin keys are configured, "
                        f"and {why}; set auth.admin_keys (or auth.admin_keys_file) and send a key to use it from "
                        "elsewhere")  # fmt: skip


def admin_access_note(access: AdminAccess) -> str:
    """The startup log line that says how the admin routes are guarded."""
    if access == "key_required":
        return "admin routes (POST /v1/admin/bundle, /v1/admin/rollback): an admin key is required from any caller"
    return ("admin routes (POST /v1/admin/bundle, /v1/admin/rollback): no admin keys configured, so they answer "
            "loopback callers only (127.0.0.0/8, ::1, not relayed by a proxy) and 403 to any other; set "
            "auth.admin_keys or auth.admin_keys_file to use them from elsewhere")  # fmt: skip


# --- reviewers -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reviewer:
    """Who decides: ``name`` from the cookie session (``session``: the body cannot rename it), else a name for the key
    (``key-<sha256 prefix>``) or ``local`` (loopback, no keys configured), which the request body may replace."""

    name: str
    session: bool = False

    def named(self, claimed: str | None) -> str:
        """The reviewer a decision is recorded under: the session's name, else ``claimed`` when given."""
        return self.name if self.session or not claimed else claimed


class ReviewSessions:
    """The review page's sessions: a random token (the ``aoi_review`` cookie) -> reviewer name, server-side, each
    ending ``ttl_s`` after it began; at most ``max_sessions`` (a new one beyond it ends the oldest). Tokens are kept
    by their sha256 only. In memory: a restart ends every session."""

    def __init__(self, ttl_s: float, max_sessions: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()  # sha256(token) -> (name, ends at)
        self._lock = threading.Lock()

    @staticmethod
    def _key(token: str) -> str:
        return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()

    def open(self, reviewer: str) -> str:
        """A new session for ``reviewer``; its token (256 random bits)."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[self._key(token)] = (reviewer, self._clock() + self.ttl_s)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        return token

    def find(self, token: str) -> str | None:
        """The reviewer of a live session, None for an unknown or ended one (an ended one is dropped)."""
        key = self._key(token)
        with self._lock:
            found = self._sessions.get(key)
            if found is None:
                return None
            if self._clock() >= found[1]:
                del self._sessions[key]
                return None
            return found[0]

    def close(self, token: str) -> None:
        with self._lock:
            self._sessions.pop(self._key(token), None)


def _review_keys(request: Request) -> tuple[bytes, ...]:
    keys: dict[str, tuple[bytes, ...]] = request.app.state.api_keys
    return keys.get("review", ()) + keys["admin"]


def _accepted(keys: tuple[bytes, ...], presented: bytes) -> bool:
    accepted = False
    for key in keys:  # every key compared, in constant time
        accepted |= hmac.compare_digest(key, presented)
    return accepted


def _require_local(request: Request) -> None:
    why = _not_local(request)
    if why is not None:
        raise Forbidden(f"{request.url.path} answers loopback callers only while no reviewer or admin keys are "
                        f"configured, and {why}; set auth.reviewer_keys (or auth.reviewer_keys_file) and send a key "
                        "to review from elsewhere")  # fmt: skip


def check_reviewer(request: Request) -> Reviewer:
    """The review routes: a reviewer or admin key (``Authorization: Bearer`` or ``X-API-Key``), or a live session
    cookie (``aoi_review``); with no reviewer and no admin keys configured, local callers only (the admin rule,
    :func:`check_admin_access`), as ``local``.

    Raises:
        Unauthorized: 401, keys configured and neither an accepted key nor a live session.
        Forbidden: 403, no keys configured and the caller is not local.
    """
    keys = _review_keys(request)
    if not keys:
        _require_local(request)
    presented = _presented(request)
    if presented and keys:
        if not _accepted(keys, presented):
            raise Unauthorized(f"{request.url.path}: the API key is not a reviewer or admin key")
        return Reviewer(f"key-{hashlib.sha256(presented).hexdigest()[:8]}")
    token = request.cookies.get(REVIEW_COOKIE)
    sessions: ReviewSessions | None = getattr(request.app.state, "review_sessions", None)
    name = sessions.find(token) if token and sessions is not None else None
    if name is not None:
        return Reviewer(name, session=True)
    if keys:
        what = "a review session that has ended" if token else "no API key and no review session"
        raise Unauthorized(f"{request.url.path} needs a reviewer or admin key (Authorization: Bearer <key>) or a "
                           f"review session (POST /review/session): got {what}")  # fmt: skip
    return Reviewer("local")


def check_review_login(request: Request, key: str) -> None:
    """``POST /review/session``: the ``key`` must be a reviewer or admin key; with none configured, the caller must
    be local (the key is then not asked for).

    Raises:
        Unauthorized: 401, keys configured and ``key`` is none of them.
        Forbidden: 403, no keys configured and the caller is not local.
    """
    keys = _review_keys(request)
    if not keys:
        _require_local(request)
    elif not _accepted(keys, key.strip().encode()):
        raise Unauthorized("that key is not a reviewer or admin key (settings auth.reviewer_keys, auth.admin_keys)")
