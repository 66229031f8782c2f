"""API keys (settings ``auth``): the one check of a presented key, used by the route dependencies
(:mod:`service.http.deps`) and by the admission gate (:mod:`service.inference.admission`)."""

from __future__ import annotations

import hmac
from typing import Literal

from starlette.requests import Request

from service.core.errors import Unauthorized

__all__ = ["check_api_key"]


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
