"""Annotated dependency aliases that keep route signatures short.

All are ``async def``: FastAPI runs a plain ``def`` dependency in a worker thread, two thread hops per request for
what are attribute lookups."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.core.errors import NotReady, ReviewDisabled
from service.http.auth import Reviewer, check_admin_access, check_api_key, check_reviewer
from service.inference.pipeline import InspectionService
from service.lifecycle.station import Station
from service.settings import Settings

__all__ = [
    "AdminAccessDep",
    "AdminAuthDep",
    "HealthAuthDep",
    "InspectAuthDep",
    "InspectServiceDep",
    "MetricsAuthDep",
    "ReadyServiceDep",
    "ReadyStationDep",
    "ReviewEnabledDep",
    "ReviewerDep",
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


async def get_ready_station(request: Request) -> Station:
    """The running station (live model, swapper), once the service is ready."""
    await get_ready_service(request)
    station: Station = request.app.state.station
    return station


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
ServiceDep = Annotated[InspectionService | None, Depends(get_service)]
ReadyServiceDep = Annotated[InspectionService, Depends(get_ready_service)]
ReadyStationDep = Annotated[Station, Depends(get_ready_station)]


async def require_inspect_key(request: Request) -> None:
    check_api_key(request, "inspect")


async def require_admin_key(request: Request) -> None:
    check_api_key(request, "admin")


async def require_admin_access(request: Request) -> None:
    check_admin_access(request)


async def require_health_key(request: Request) -> None:
    if request.app.state.settings.auth.protect_health:
        check_api_key(request, "admin")


async def require_metrics_key(request: Request) -> None:
    if request.app.state.settings.auth.protect_metrics:
        check_api_key(request, "admin")


async def get_inspect_service(request: Request) -> InspectionService:
    """The inference routes' one dependency: the inspect key (401), then the ready service (503). One instead of
    three (key, service, settings): FastAPI resolves each dependency on every request, and these routes are the hot
    path (docs/measurements.md, M12)."""
    check_api_key(request, "inspect")
    return await get_ready_service(request)


InspectAuthDep = Annotated[None, Depends(require_inspect_key)]
InspectServiceDep = Annotated[InspectionService, Depends(get_inspect_service)]  # key checked, then ready
AdminAuthDep = Annotated[None, Depends(require_admin_key)]
AdminAccessDep = Annotated[None, Depends(require_admin_access)]  # /v1/admin/*: key, else loopback callers only
HealthAuthDep = Annotated[None, Depends(require_health_key)]
MetricsAuthDep = Annotated[None, Depends(require_metrics_key)]


async def require_review_enabled(request: Request) -> None:
    if not request.app.state.settings.review.enabled:
        raise ReviewDisabled("the review page and API are off (setting review.enabled)")


async def require_reviewer(request: Request) -> Reviewer:
    """``review.enabled`` (else 404), then who reviews (:func:`service.http.auth.check_reviewer`: 401, 403)."""
    await require_review_enabled(request)
    return check_reviewer(request)


ReviewEnabledDep = Annotated[None, Depends(require_review_enabled)]  # 404 review_disabled while review.enabled is off
ReviewerDep = Annotated[Reviewer, Depends(require_reviewer)]  # the review page and API: key or session (docs/review.md)
