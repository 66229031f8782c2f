"""API keys (settings ``auth``): the one check of a presented key, used by the route dependencies
(:mod:`service.http.deps`) and by the admission gate (:mod:`service.inference.admission`); and who may use the admin
routes while no admin key is configured (callers on loopback only, :func:`check_admin_access`)."""

from __future__ import annotations

import hmac
import ipaddress
from typing import Literal

from starlette.requests import Request

from service.core.errors import Forbidden, Unauthorized

__all__ = [
    "FORWARDING_HEADERS",
    "AdminAccess",
    "admin_access",
    "admin_access_note",
    "check_admin_access",
    "check_api_key",
]

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
