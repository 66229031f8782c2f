"""The station resource: who this service is in the plant (``station_id``, ``line_id``) and the state of its link to
the central store (forwarder backlog, watermark, last error; image uploads). Admin key when keys are set."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

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


@station_router.get(
    "/v1/station", response_model=StationInfo, responses={401: {"model": ErrorBody}, 503: {"model": ErrorBody}}
)
async def station(_auth: AdminAuthDep, station: ReadyStationDep) -> StationInfo:
    """This station's identity and its forwarding to the central store. Never depends on the central store being
    up (the state is the forwarder's own), and never shows the DSN."""
    return StationInfo.model_validate(station.identity())
