"""App factory: ``create_app(settings)`` wires the lifespan (load bundle + backend, warm up, start the batcher), the
routes, the error handlers, the request-id/metrics middleware and ``/metrics``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.backends import BackendChoice, InferenceBackend
from service.core.bundle import ModelBundle
from service.http.auth import ReviewSessions, admin_access, admin_access_note
from service.http.deps import MetricsAuthDep
from service.http.errors import install_exception_handlers
from service.http.middleware import AdmissionGate, RequestContextMiddleware
from service.http.routes.health import health_router
from service.http.routes.inspect import router
from service.http.routes.model import model_router
from service.http.routes.plant import plant_router
from service.http.routes.records import records_router
from service.http.routes.review import review_router
from service.http.routes.review_page import review_page_router
from service.http.routes.station import station_router
from service.http.routes.v2 import v2_router
from service.http.schemas import ErrorBody
from service.inference.metrics import ServiceMetrics
from service.lifecycle.station import Station
from service.settings import Settings

__all__ = ["create_app"]

logger = logging.getLogger(__name__)


def _route_labels(app: FastAPI) -> frozenset[str]:
    """The paths of the API routes, which label request durations: the service router's (included without a prefix)
    and the app's own (``/metrics``), not the docs pages. Read from the routes, so a new route needs no list edit."""
    routers = (
        router, health_router, model_router, records_router, plant_router, station_router, v2_router, review_router,
    )  # fmt: skip
    routes = [*(r for rt in routers for r in rt.routes), *app.routes]
    return frozenset(r.path for r in routes if isinstance(r, APIRoute))


def _configure_opencv(threads: int) -> None:
    """OpenCV for serving (process-wide): silent, and at most ``threads`` threads inside one call (the setting
    ``opencv_threads``; 0: OpenCV's default)."""
    import cv2

    # Bad uploads are expected traffic: OpenCV's own decoder errors would flood stderr; ours are logged and counted.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    cv2.setNumThreads(threads or -1)  # OpenCV: -1 = its default


def create_app(
    settings: Settings,
    *,
    bundle: ModelBundle | None = None,
    backend: BackendChoice | InferenceBackend | None = None,
    metrics: ServiceMetrics | None = None,
    freeze_heap: bool = False,
) -> FastAPI:
    """Build the service. ``bundle`` / ``backend`` may be passed pre-loaded (the CLI loads them before uvicorn starts,
    so errors are reported cleanly; tests pass fakes); otherwise the lifespan loads them from ``settings``.
    ``freeze_heap``: once warm, keep the startup heap out of the garbage collector's full passes
    (:func:`service.lifecycle.memory.freeze_heap`; the server process does, tests that build many apps in one process
    not)."""
    metrics = metrics or ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _configure_opencv(settings.opencv_threads)
        station = await Station.open(settings, metrics, bundle, backend)
        app.state.records = station.records
        try:
            await station.start(freeze_heap=freeze_heap)
            app.state.station = station
            app.state.service = station.service
            logger.info(admin_access_note(app.state.admin_access))
            yield
        finally:
            await station.stop()

    app = FastAPI(
        title="aoi-inspect",
        version="0.1.0",
        summary="Defect-inspection service: detections and an OK/NG verdict per image.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.api_keys = {scope: settings.auth.keys(scope) for scope in ("inspect", "admin", "review")}
    app.state.review_sessions = ReviewSessions(settings.review.session_ttl_s, settings.review.max_sessions)
    app.state.admin_access = admin_access(app.state.api_keys["admin"])
    app.state.metrics = metrics
    app.include_router(router)
    app.include_router(v2_router)  # right after v1: routes are matched router by router, in this order
    app.include_router(model_router)
    app.include_router(health_router)
    app.include_router(records_router)
    app.include_router(plant_router)
    app.include_router(station_router)
    app.include_router(review_router)  # the review API and session (docs/review.md)
    app.include_router(review_page_router)  # /review: the page (the review API is its own router)
    install_exception_handlers(app, metrics)

    @app.get(
        "/metrics",
        tags=["health"],
        response_class=Response,
        responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"},
            401: {"model": ErrorBody, "description": "auth.protect_metrics is on and no accepted admin key was sent"},
        },
    )
    async def prometheus_metrics(_auth: MetricsAuthDep) -> Response:
        """Prometheus text format (metric names in docs/service.md)."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(AdmissionGate)  # inside the request-id middleware (added last, so outermost)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, routes=_route_labels(app))
    return app
