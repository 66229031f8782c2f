"""Settings of the central store (DSN, station identity, batching, backoff, the NG images' object store) and DSN
redaction for logs and errors."""

from __future__ import annotations

import re
from typing import Any

from pydantic import ConfigDict, Field, SecretStr

from service.settings import CentralStoreSettings, Settings

__all__ = ["CentralSettings", "redact_dsn", "scrub"]

_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/?#@\s]*:)(?P<pw>[^@/?#\s]*)(?P<tail>@)", re.IGNORECASE)
_KV_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<pw>'(?:[^'\\]|\\.)*'|[^\s]*)", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)(?P<pw>[^&#\s]*)", re.IGNORECASE)
MASK = "***"


def redact_dsn(dsn: str) -> str:
    """``dsn`` (URL or ``key=value`` form) with every password replaced by ``***``: safe to log or show.

    Handles ``postgresql://user:pw@host/db``, ``...?password=pw`` and ``host=h password=pw`` (quoted or not).
    """
    if "://" in dsn:
        text = _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}{m['tail']}", dsn)
        return _QUERY_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", text)
    return _KV_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", dsn)


def _password_of(dsn: str) -> str | None:
    for pattern in (_URL_PASSWORD, _QUERY_PASSWORD, _KV_PASSWORD):
        match = pattern.search(dsn)
        if match and match["pw"] not in ("", MASK):
            return match["pw"].strip("'")
    return None


def scrub(text: str, dsn: str) -> str:
    """``text`` (an exception message, a log line) with ``dsn``'s password and any DSN-looking password masked.

    Driver messages may quote part of a malformed connection string: this is applied to every message that leaves
    the package, so the secret never reaches a log, a metric label or a status route.
    """
    password = _password_of(dsn)
    if password:
        text = text.replace(password, MASK)
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}{m['tail']}", text)
    text = _QUERY_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", text)
    return _KV_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", text)  # may over-mask a message: never under-mask


class CentralSettings(CentralStoreSettings):
    """Where and how this station forwards its records: the service's ``central`` settings with the DSN resolved and
    the station's identity (:meth:`for_station`). Secrets come from the environment or files, never flags.

    Attributes:
        dsn: libpq connection string or ``postgresql://`` URL of the central database (never logged: see
            :func:`redact_dsn`).
        station_id: this station's identity, the first half of every central key; must stay the same for the life
            of its journal (a new id would resend the whole journal as new records).
        line_id: the production line, stored on every record for plant queries (two stations may share a line).
        batch_size: records per transaction; one batch is the most a crash can make the station resend.
        poll_interval_s: how long the idle forwarder (and image uploader) waits for ``wake()`` before looking
            anyway; while backing off, how often their gauges are refreshed.
        min_backoff_s / max_backoff_s: the shortest and the longest wait after a failed attempt (the forwarder's
            reconnect, the image uploader's retry). The waits follow the service's one backoff
            (:func:`service.signals.sink.backoff_s`: doubling from 0.2 s, equal jitter), entered at the first
            doubling that reaches ``min_backoff_s``, never below it and never above ``max_backoff_s``.
        connect_timeout_s / statement_timeout_s: bounds on one connection attempt and one statement, so a hung
            network never stalls the thread for longer than this.
        migrate: run the central migrations at connect (needs DDL rights; otherwise an operator runs
            :func:`service.records.central.schema.upgrade` once).
        objects: where NG images are uploaded (None: images stay ``pending`` in central and on the station's disk).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    dsn: SecretStr
    station_id: str = Field(min_length=1, max_length=200)
    line_id: str | None = None

    @classmethod
    def for_station(cls, settings: Settings) -> CentralSettings | None:
        """The forwarding of a service's ``settings`` (None: ``central`` is off).

        Raises:
            ValueError: the DSN file cannot be read (names the file, never the DSN).
        """
        central = settings.central
        if not central.enabled:
            return None
        values = central.model_dump(exclude={"dsn", "dsn_file"})
        dsn = central.resolved_dsn()
        return cls(**values, dsn=dsn, station_id=settings.station_id, line_id=settings.line_id)

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``psycopg.connect`` besides the DSN: timeouts, keepalives, application name.

        ``synchronous_commit=off``: a batch's commit returns before the central server flushes its WAL (it does within
        ``wal_writer_delay``, 200 ms by default), so the central database does not fsync once per batch. Safe here
        because the station's journal is the durable copy: a central crash that loses the last acknowledged batches
        lowers ``max(seq)``, which the forwarder reads back at its reconnect and resends from (records retention
        keeps days of journal, never the last second)."""
        return {
            "connect_timeout": self.connect_timeout_s,
            "application_name": f"aoi-forwarder/{self.station_id}"[:63],
            "options": f"-c statement_timeout={int(self.statement_timeout_s * 1000)} -c synchronous_commit=off",
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
        }
