"""Alembic online environment: one transaction per upgrade, serialized across stations by an advisory lock."""

from __future__ import annotations

import psycopg
from alembic import context
from sqlalchemy import create_engine, pool, text

# Two stations starting at once with ``migrate`` on would otherwise race on the same DDL; the lock is released with
# the transaction, and the second one then finds the schema at head and does nothing.
MIGRATION_LOCK_KEY = 0x416F6943  # "AoiC"


def run_migrations_online() -> None:
    dsn = str(context.config.attributes["dsn"])
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection, connection.begin():
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            context.configure(connection=connection, transactional_ddl=True)
            context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("the central schema is migrated online only (service.records.central.schema.upgrade)")
run_migrations_online()
