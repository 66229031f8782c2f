"""Admin endpoints of the live model swap (docs/service.md, "Live model swap"); admin key when keys are set."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.http.deps import AdminAuthDep, ReadyServiceDep
from service.http.schemas import ErrorBody, SwapInfo, SwapRequest, SwapResponse
from service.lifecycle.swap import SwapEvent

__all__ = ["admin_router"]

admin_router = APIRouter(tags=["admin"])
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "admin keys are configured and the request has none that is accepted"},
    409: {"model": ErrorBody, "description": "another swap is in progress"},
    422: {"model": ErrorBody, "description": "the bundle was refused (path, hashes, backend, warm-up, smoke check); "
          "the old model keeps serving"},
    503: {"model": ErrorBody, "description": "not ready"},
}  # fmt: skip


def _response(service: Any, event: SwapEvent) -> SwapResponse:
    return SwapResponse(status="swapped", swap=SwapInfo.model_validate(event.as_dict()), model=service.model_info())


@admin_router.post("/v1/admin/bundle", response_model=SwapResponse, responses=_ERRORS)
async def swap_bundle(body: SwapRequest, _auth: AdminAuthDep, service: ReadyServiceDep) -> SwapResponse:
    """Load the bundle in ``path`` (under ``swap.bundle_root``) beside the serving one: hashes validated, every batch
    size warmed up, a smoke check, then an atomic switch. Requests in flight finish on the model they started with;
    on any failure the old model keeps serving and the 422 says why."""
    swapper = service.swapper
    event = await swapper.swap(swapper.resolve(body.path), "api")
    return _response(service, event)


@admin_router.post("/v1/admin/rollback", response_model=SwapResponse, responses=_ERRORS)
async def rollback(_auth: AdminAuthDep, service: ReadyServiceDep) -> SwapResponse:
    """One step back: swap to the bundle served before the last swap (checked like any new bundle)."""
    event = await service.swapper.rollback()
    return _response(service, event)
