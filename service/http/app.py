"""App factory: ``create_app(settings)`` wires the lifespan (load bundle + backend, warm up, start the batcher), the
routes, the error handlers, the request-id/metrics middleware and ``/metrics``."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.backends import BackendChoice, InferenceBackend, backend_from_settings, instances_for
from service.core.bundle import BundleError, ModelBundle, load_bundle
from service.core.errors import install_exception_handlers
from service.http.deps import MetricsAuthDep
from service.http.routes.admin import admin_router
from service.http.routes.inspect import router
from service.http.routes.records import records_router
from service.inference.admission import AdmissionGate
from service.inference.metrics import ServiceMetrics, StageObserver
from service.inference.pipeline import InspectionService
from service.lifecycle import memory
from service.log_config import new_request_id, request_id_var
from service.records.stage import RecordStage
from service.records.store import RecordStore
from service.settings import Settings
from service.signals.hub import Signals

__all__ = ["create_app"]

logger = logging.getLogger(__name__)


class RequestContextMiddleware:
    """Pure ASGI (cheaper than BaseHTTPMiddleware): request id from ``X-Request-ID`` or generated, echoed back; request
    duration by route and status; in-flight gauge. Paths outside ``routes`` share the route label ``other``."""

    def __init__(self, app: ASGIApp, metrics: StageObserver, routes: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")[:128]
        rid = rid or new_request_id()
        token = request_id_var.set(rid)
        path = scope["path"]
        route = path if path in self.routes else "other"
        status = 500
        started = False
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        self.metrics.request_started()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Answered here, not by Starlette's outermost error middleware: that one runs after the request id is
            # gone and sends without the X-Request-ID header. A response already under way cannot be replaced.
            if started:
                raise
            logger.exception("unhandled error on %s %s", scope.get("method"), path)
            self.metrics.request_failed("internal_error")
            await _send_internal_error(send_with_id, rid)
        finally:
            self.metrics.request_finished(route, status, time.perf_counter() - start)
            request_id_var.reset(token)


async def _send_internal_error(send: Send, rid: str) -> None:
    body = json.dumps({"code": "internal_error", "message": "internal error; see the service log", "request_id": rid})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 500, "headers": headers})
    await send({"type": "http.response.body", "body": body.encode()})


def _open_records(settings: Settings, metrics: ServiceMetrics) -> tuple[RecordStore | None, Signals | None]:
    """The record store (``records.enabled``) and the signals (a sink configured) under ``data_dir``, started.

    Raises:
        whatever opening them raises (an unusable data folder): startup fails and says why.
    """
    store = None
    if settings.records.enabled:
        store = RecordStore(settings.records, settings.data_dir, metrics.registry)
        store.start()
        logger.info(
            "records: every answered image is recorded in %s (%s), NG images kept under %s",
            store.db_path.resolve(), settings.records.durability, (settings.data_dir / "images").resolve(),
        )  # fmt: skip
    signals = Signals(settings.signals, settings.data_dir, metrics.registry)
    if not signals.enabled:
        return store, None
    signals.start()
    return store, signals


def _source_folder(folder: Path, bundle: ModelBundle) -> Path | None:
    """``folder`` when it holds ``bundle`` (it was loaded from there), for its hash and SIGHUP reloads; None when the
    bundle was built in memory (tests)."""
    try:
        return folder if load_bundle(folder, verify_hashes=False) == bundle else None
    except BundleError:
        return None


def _route_labels(app: FastAPI) -> frozenset[str]:
    """The paths of the API routes, which label request durations: the service router's (included without a prefix)
    and the app's own (``/metrics``), not the docs pages. Read from the routes, so a new route needs no list edit."""
    routes = [*router.routes, *admin_router.routes, *records_router.routes, *app.routes]
    return frozenset(r.path for r in routes if isinstance(r, APIRoute))


def _silence_opencv() -> None:
    # Bad uploads are expected traffic: OpenCV's own decoder errors would flood stderr; ours are logged and counted.
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


async def _record_gc(pauses: memory.GcPauses, metrics: ServiceMetrics, every_s: float = 1.0) -> None:
    """Move the collector's pauses into ``aoi_gc_pause_seconds`` every ``every_s`` (not from inside the hook)."""
    while True:
        await asyncio.sleep(every_s)
        metrics.gc_paused(pauses.drain())


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
        _silence_opencv()
        b = bundle if bundle is not None else await asyncio.to_thread(load_bundle, settings.bundle)
        choice = backend
        if choice is None:
            choice = await asyncio.to_thread(backend_from_settings, settings, b)
        if not isinstance(choice, BackendChoice):
            n = instances_for(choice.kind, settings.instances, choice)
            choice = BackendChoice(choice, f"{choice.kind} passed to create_app", n)
        store, signals = await asyncio.to_thread(_open_records, settings, metrics)
        app.state.records = store
        recorder = RecordStage(settings.records, store, signals)
        service = InspectionService(
            settings, b, choice, metrics, source=_source_folder(settings.bundle, b), recorder=recorder
        )
        gc_pauses = memory.GcPauses()
        gc_task: asyncio.Task[None] | None = None
        try:
            await service.start()
            app.state.service = service
            if freeze_heap:
                memory.freeze_heap()
            gc_pauses.start()
            gc_task = asyncio.get_running_loop().create_task(_record_gc(gc_pauses, metrics), name="aoi-gc")
            yield
        finally:
            gc_pauses.stop()
            if gc_task is not None:
                gc_task.cancel()
            metrics.gc_paused(gc_pauses.drain())
            logger.info("shutting down")
            t0 = time.monotonic()
            await service.stop()
            flush_s = max(1.0, 0.25 * settings.stop_timeout_ms / 1000.0)
            if store is not None:
                await store.close(flush_s)
            if signals is not None:
                await signals.close(max(0.5, flush_s - (time.monotonic() - t0)))
            logger.info("stopped in %.2f s after the last request", time.monotonic() - t0)

    app = FastAPI(
        title="aoi-inspect",
        version="0.1.0",
        summary="Defect-inspection service: detections and an OK/NG verdict per image.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.api_keys = {"inspect": settings.auth.keys("inspect"), "admin": settings.auth.keys("admin")}
    app.state.metrics = metrics
    app.include_router(router)
    app.include_router(admin_router)
    app.include_router(records_router)
    install_exception_handlers(app, metrics)

    @app.get(
        "/metrics",
        tags=["health"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"}},
    )
    async def prometheus_metrics(_auth: MetricsAuthDep) -> Response:
        """Prometheus text format (metric names in docs/service.md)."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(AdmissionGate)  # inside the request-id middleware (added last, so outermost)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, routes=_route_labels(app))
    return app
