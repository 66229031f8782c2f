"""The model resource: what is served (``GET /v1/model``, admin key when keys are set) and the admin routes of the
live swap and rollback (docs/service.md, "Live model swap"): admin key when keys are set, else loopback callers only
(:func:`service.http.auth.check_admin_access`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.core.results import ModelInfo, SwapInfo
from service.http.deps import AdminAccessDep, AdminAuthDep, ReadyStationDep
from service.http.schemas import ErrorBody, SwapRequest, SwapResponse
from service.lifecycle.station import Station
from service.lifecycle.swap import SwapEvent

__all__ = ["model_router"]

model_router = APIRouter()
_UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "admin keys are configured and the request has none that is accepted"},
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    **_UNAUTHORIZED,
    403: {"model": ErrorBody, "description": "no admin keys are configured and the caller is not on loopback, or a "
          "proxy relayed the request (forbidden)"},
    409: {"model": ErrorBody, "description": "another swap is in progress"},
    422: {"model": ErrorBody, "description": "bundle_refused: the bundle was refused (path, hashes, backend, warm-up, "
          "smoke check), the old model keeps serving; invalid_request: the body is not {\"path\": ...}"},
    503: {"model": ErrorBody, "description": "not ready"},
}  # fmt: skip
_BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "the body could not be parsed as JSON at all (bad_request)"},
    **_ERRORS,
}


def _response(station: Station, event: SwapEvent) -> SwapResponse:
    return SwapResponse(status="swapped", swap=SwapInfo.model_validate(event.as_dict()), model=station.model_info())


@model_router.get(
    "/v1/model", tags=["model"], response_model=ModelInfo, responses={**_UNAUTHORIZED, 503: {"model": ErrorBody}}
)
async def model_info(_auth: AdminAuthDep, station: ReadyStationDep) -> ModelInfo:
    """Bundle metadata, the backend and device really in use, served batch sizes and effective thresholds."""
    return station.model_info()


@model_router.post("/v1/admin/bundle", tags=["admin"], response_model=SwapResponse, responses=_BODY_ERRORS)
async def swap_bundle(body: SwapRequest, _auth: AdminAccessDep, station: ReadyStationDep) -> SwapResponse:
    """Load the bundle in ``path`` (under ``swap.bundle_root``) beside the serving one: hashes validated, every batch
    size warmed up, a smoke check, then an atomic switch. Requests in flight finish on the model they started with;
    on any failure the old model keeps serving and the 422 says why."""
    swapper = station.swapper
    event = await swapper.swap(swapper.resolve(body.path), "api")
    return _response(station, event)


@model_router.post("/v1/admin/rollback", tags=["admin"], response_model=SwapResponse, responses=_ERRORS)
async def rollback(_auth: AdminAccessDep, station: ReadyStationDep) -> SwapResponse:
    """One step back: swap to the bundle served before the last swap (checked like any new bundle)."""
    event = await station.swapper.rollback()
    return _response(station, event)
