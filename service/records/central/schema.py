"""The central schema: Alembic migrations run from code (no alembic.ini), the version check and the retention job.

Retention: the central store keeps records for the plant's retention period, then :func:`prune_before` deletes
whole (station, seq) records older than a cutoff, their detections and image references with them (``ON DELETE
CASCADE``), in bounded batches so a daily job never holds long locks. Run it from cron or a Kubernetes CronJob, e.g.
``prune_before(conn, now - 400 days)``; objects in storage expire by a bucket lifecycle rule of the same age. The
tables are not partitioned yet: monthly range partitions on received_at would turn pruning into ``DROP TABLE`` of
old partitions, but would force received_at into every unique key (the idempotency key is (station_id, seq)).
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from service.records.central.settings import scrub

__all__ = ["CentralSchemaError", "check_schema", "current_revision", "head_revision", "prune_before", "upgrade"]

logger = logging.getLogger(__name__)
MIGRATIONS_DIR = Path(__file__).with_name("migrations")


class CentralSchemaError(Exception):
    """The central database is not at the schema this code writes (not migrated, or migrated by newer code)."""


def _config(dsn: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["dsn"] = dsn
    return config


def head_revision() -> str:
    """The newest revision this code knows."""
    head = ScriptDirectory.from_config(_config("")).get_current_head()
    if head is None:
        raise CentralSchemaError(f"no migrations found under {MIGRATIONS_DIR}")
    return head


def upgrade(dsn: str) -> None:
    """Bring the central database at ``dsn`` to :func:`head_revision`, in one transaction (idempotent; safe to run
    from several stations at once: an advisory lock serializes them).

    Raises:
        CentralSchemaError: the migration failed (message without the DSN's password).
    """
    try:
        command.upgrade(_config(dsn), "head")
    except Exception as exc:
        raise CentralSchemaError(f"central schema migration failed: {scrub(str(exc), dsn)}") from None
    logger.info("central schema at revision %s", head_revision())


def current_revision(conn: psycopg.Connection[Any]) -> str | None:
    """The revision the database says it is at, None when it was never migrated."""
    exists = conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return None
    row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    return None if row is None else str(row[0])


def check_schema(conn: psycopg.Connection[Any]) -> None:
    """Raises: CentralSchemaError unless the database is at :func:`head_revision`."""
    found, head = current_revision(conn), head_revision()
    if found != head:
        what = "never migrated" if found is None else f"at revision {found}"
        raise CentralSchemaError(f"central database is {what}, this code writes {head}: run the migrations (upgrade)")


def prune_before(conn: psycopg.Connection[Any], cutoff: datetime, batch: int = 10_000) -> int:
    """Delete every central record received before ``cutoff`` (timezone-aware), with its detections and image
    references, ``batch`` records per transaction; return how many were deleted.

    ``conn`` must be in autocommit mode (each batch commits on its own, so locks are short and progress survives
    an interruption). The objects themselves are not touched: the bucket's lifecycle rule expires them.
    """
    if cutoff.tzinfo is None:
        raise ValueError("cutoff must be timezone-aware (received_at is a timestamptz)")
    if not conn.autocommit:
        raise ValueError("prune_before needs an autocommit connection (one transaction per batch)")
    total = 0
    while True:
        cur = conn.execute(
            """DELETE FROM inspections WHERE (station_id, seq) IN (
                   SELECT station_id, seq FROM inspections WHERE received_at < %s
                   ORDER BY received_at LIMIT %s)""",
            [cutoff, batch],
        )
        total += cur.rowcount
        if cur.rowcount < batch:
            return total
