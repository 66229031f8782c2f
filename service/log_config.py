"""Logging setup (JSON lines in production, plain text in dev) and the request-id context variable."""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from contextvars import ContextVar
from typing import Any

__all__ = ["JsonFormatter", "StderrHandler", "new_request_id", "request_id_var", "setup_logging"]

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
_ids = random.Random(os.urandom(16))
os.register_at_fork(after_in_child=lambda: _ids.seed(os.urandom(16)))  # pre-forked workers must not share a sequence


def new_request_id() -> str:
    """32 hex digits, unique in practice (128 random bits). Not a secret, so drawn from a PRNG seeded once from the
    OS: ``uuid4`` reads ``os.urandom`` per call, a system call at every request (docs/measurements.md, M6)."""
    return f"{_ids.getrandbits(128):032x}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id (when set), exc (traceback, when any)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid is not None:
            doc["request_id"] = rid
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        rid = request_id_var.get()
        line = super().format(record)
        return f"{line} [request_id={rid}]" if rid else line


class StderrHandler(logging.StreamHandler[Any]):
    """Writes to whatever ``sys.stderr`` is at each record, so the handler never outlives a replaced stream (pytest
    closes its captured streams after each test; a handler holding one raised "I/O operation on closed file")."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # logging.StreamHandler assigns it; the live sys.stderr wins
        pass


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Configure the root logger once (replacing its handlers), and route uvicorn's loggers through it."""
    handler = StderrHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    # Per-request access lines belong in metrics, not logs (STYLE: per-request lines only at DEBUG).
    logging.getLogger("uvicorn.access").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    # The webhook sender's client would log one line per verdict delivered; failures are logged by the sender.
    logging.getLogger("httpx").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
