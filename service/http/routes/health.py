"""Liveness and readiness (plus the KServe v2 health aliases): what a load balancer or Kubernetes probes."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.http.deps import HealthAuthDep, ServiceDep
from service.http.schemas import ErrorBody, Health

__all__ = ["health_router"]

health_router = APIRouter(tags=["health"])
_UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "auth.protect_health is on and no accepted admin key was sent"}
}


@health_router.get("/healthz", tags=["health"], response_model=Health, responses=_UNAUTHORIZED)
@health_router.get("/v2/health/live", tags=["health"], response_model=Health, include_in_schema=False)
async def live(_auth: HealthAuthDep) -> Health:
    """Liveness: the process serves HTTP."""
    return Health(status="ok")


@health_router.get(
    "/readyz", tags=["health"], response_model=Health, responses={**_UNAUTHORIZED, 503: {"model": Health}}
)
@health_router.get("/v2/health/ready", tags=["health"], response_model=Health, include_in_schema=False)
async def ready(_auth: HealthAuthDep, service: ServiceDep) -> Health | JSONResponse:
    """Readiness: bundle loaded, every served batch size warmed up, batcher running."""
    if service is None or not service.ready or not service.model.batcher.running:
        body = Health(status="not_ready", detail="loading or warming up the model")
        return JSONResponse(status_code=503, content=body.model_dump())
    return Health(status="ready")
