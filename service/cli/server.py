"""uvicorn's server, told about SIGTERM before it waits for the requests in flight (graceful stop)."""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from types import FrameType

import uvicorn

__all__ = ["StoppingServer"]


class StoppingServer(uvicorn.Server):
    """On SIGTERM / SIGINT the service hears it at once (:meth:`InspectionService.begin_stop`: readiness off, nothing
    new admitted); uvicorn then stops accepting, lets the admitted requests finish within its graceful timeout, and
    the lifespan flushes records and the outbox."""

    def __init__(self, config: uvicorn.Config, app: object) -> None:
        super().__init__(config)
        self._app = app

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """uvicorn's, except that a stop it completed gracefully exits with 0 (uvicorn re-raises the signal, so the
        process would end "killed by SIGTERM" after a clean stop, which supervisors report as a failure)."""
        with super().capture_signals():
            yield
            self._captured_signals.clear()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        service = getattr(getattr(self._app, "state", None), "service", None)
        if service is not None and not self.should_exit:
            service.begin_stop()
        super().handle_exit(sig, frame)
