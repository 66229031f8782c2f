"""Annotated dependency aliases that keep route signatures short.

All are ``async def``: FastAPI runs a plain ``def`` dependency in a worker thread, two thread hops per request for
what are attribute lookups."""

from __future__ import annotations

import hmac
from typing import Annotated, Literal

from fastapi import Depends, Request

from service.errors import NotReady, Unauthorized
from service.pipeline import InspectionService
from service.settings import Settings

__all__ = [
    "AdminAuthDep",
    "HealthAuthDep",
    "InspectAuthDep",
    "MetricsAuthDep",
    "ReadyServiceDep",
    "ServiceDep",
    "SettingsDep",
    "check_api_key",
]


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_service(request: Request) -> InspectionService | None:
    return getattr(request.app.state, "service", None)


async def get_ready_service(request: Request) -> InspectionService:
    service = await get_service(request)
    if service is None or not service.ready:
        raise NotReady("the model is still loading or warming up; retry when /readyz says ready")
    return service


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
ServiceDep = Annotated[InspectionService | None, Depends(get_service)]
ReadyServiceDep = Annotated[InspectionService, Depends(get_ready_service)]


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


async def require_inspect_key(request: Request) -> None:
    check_api_key(request, "inspect")


async def require_admin_key(request: Request) -> None:
    check_api_key(request, "admin")


async def require_health_key(request: Request) -> None:
    if request.app.state.settings.auth.protect_health:
        check_api_key(request, "admin")


async def require_metrics_key(request: Request) -> None:
    if request.app.state.settings.auth.protect_metrics:
        check_api_key(request, "admin")


InspectAuthDep = Annotated[None, Depends(require_inspect_key)]
AdminAuthDep = Annotated[None, Depends(require_admin_key)]
HealthAuthDep = Annotated[None, Depends(require_health_key)]
MetricsAuthDep = Annotated[None, Depends(require_metrics_key)]
