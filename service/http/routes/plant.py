"""The plant's records: ``GET /v1/plant/inspections`` answers the station's filters (plus station and line) across
every station that forwards to the central store this station forwards to (docs/records.md, "Plant-wide records").
Admin key. The station's own ``/v1/inspections`` never depends on the central store; this route does, and says so
with a 503 ``central_unavailable``."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from service.core.errors import CentralDisabled, InvalidQuery
from service.http.deps import AdminAuthDep, ReadyStationDep
from service.http.routes.records import FiltersDep, RecordFields
from service.http.schemas import ErrorBody

__all__ = ["plant_router"]

plant_router = APIRouter(prefix="/v1/plant", tags=["records"])
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "admin keys are configured and the request has none that is accepted"},
    404: {"model": ErrorBody, "description": "central_disabled: this station forwards to no central store"},
    422: {"model": ErrorBody, "description": "a query parameter out of range, a bad time or cursor"},
    503: {"model": ErrorBody, "description": "central_unavailable: the central store did not answer; or not ready"},
}


class CentralImage(BaseModel):
    """The NG image of a central record: ``pending`` until its upload is verified, then ``stored`` at
    ``object_key``; ``missing`` when the station's file was deleted before it could be uploaded."""

    state: Literal["pending", "stored", "missing"]
    object_key: str
    sha256: str
    bytes: int | None


class PlantRecord(RecordFields):
    """One image's record as the central store holds it: the station's record, keyed by station and seq."""

    station_id: str
    line_id: str | None
    seq: int = Field(description="the record's seq in its station's journal")
    image: CentralImage | None = Field(description="null when the station archived no image")


class PlantPage(BaseModel):
    """One page, newest first; pass ``next_cursor`` back as ``cursor`` for the next (null on the last page)."""

    items: list[PlantRecord]
    next_cursor: str | None


@plant_router.get("/inspections", response_model=PlantPage, responses=_ERRORS, summary="Search the plant's records")
async def plant_inspections(
    _auth: AdminAuthDep,
    station: ReadyStationDep,
    local: FiltersDep,
    station_id: Annotated[str | None, Query(max_length=200)] = None,
    line_id: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=200, description="next_cursor of the previous page")] = None,
) -> PlantPage:
    """Records of every station newest first (received_at, then station and seq), filtered, keyset-paginated."""
    from service.records.central.query import PlantFilters

    if station.plant is None:
        raise CentralDisabled("this station forwards to no central store (settings central.dsn / central.dsn_file)")
    filters = PlantFilters.of(local, station_id=station_id, line_id=line_id)
    try:
        items, next_cursor = await asyncio.to_thread(station.plant.query, filters, limit, cursor)
    except ValueError as exc:
        raise InvalidQuery(f"cursor: {exc}") from None
    return PlantPage.model_validate({"items": items, "next_cursor": next_cursor})
