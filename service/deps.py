"""Annotated dependency aliases that keep route signatures short.

All are ``async def``: FastAPI runs a plain ``def`` dependency in a worker thread, two thread hops per request for
what are attribute lookups."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.errors import NotReady
from service.pipeline import InspectionService
from service.settings import Settings

__all__ = ["ReadyServiceDep", "ServiceDep", "SettingsDep"]


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
