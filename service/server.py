"""uvicorn's server, told about SIGTERM before it waits for the requests in flight (graceful stop)."""

from __future__ import annotations

from types import FrameType

import uvicorn
from starlette.types import ASGIApp

__all__ = ["StoppingServer"]


class StoppingServer(uvicorn.Server):
    """On SIGTERM / SIGINT the service hears it at once (:meth:`InspectionService.begin_stop`: readiness off, nothing
    new admitted); uvicorn then stops accepting, lets the admitted requests finish within its graceful timeout, and
    the lifespan flushes records and the outbox."""

    def __init__(self, config: uvicorn.Config, app: ASGIApp) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        service = getattr(getattr(self._app, "state", None), "service", None)
        if service is not None and not self.should_exit:
            service.begin_stop()
        super().handle_exit(sig, frame)
