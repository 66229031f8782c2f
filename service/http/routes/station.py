"""The station resource: who this service is in the plant (``station_id``, ``line_id``) and the state of its link to
the central store (forwarder backlog, watermark, last error; image uploads). Admin key when keys are set."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from service.http.auth import AdminAccess
from service.http.deps import AdminAuthDep, ReadyStationDep
from service.http.schemas import ErrorBody

__all__ = ["station_router"]

station_router = APIRouter(tags=["station"])


class StationInfo(BaseModel):
    station_id: str = Field(description="setting station_id (default: the host name); the central key's first half")
    line_id: str | None = Field(description="setting line_id")
    records: bool = Field(description="records are kept (the journal the plant is fed from)")
    central: dict[str, Any] | None = Field(
        description="null while central is off; else {forwarder: {connected, watermark, acknowledged_seq, backlog, "
        "oldest_unforwarded_s, consecutive_failures, last_success_at, last_error}, images: {...} or null}"
    )
    admin_routes: AdminAccess = Field(
        description="how POST /v1/admin/* (swap, rollback) is guarded: key_required (admin keys are configured) or "
        "loopback_only (no admin keys: loopback callers only, 403 for any other)"
    )


@station_router.get(
    "/v1/station", response_model=StationInfo, responses={401: {"model": ErrorBody}, 503: {"model": ErrorBody}}
)
async def station(request: Request, _auth: AdminAuthDep, station: ReadyStationDep) -> StationInfo:
    """This station's identity, its forwarding to the central store and how its admin routes are guarded. Never
    depends on the central store being up (the state is the forwarder's own), and never shows the DSN."""
    return StationInfo.model_validate({**station.identity(), "admin_routes": request.app.state.admin_access})
