"""service/records/central/schema.py: migrations run from code and are idempotent, an unmigrated database is a
``schema`` failure (or migrated on connect when asked), and the retention job deletes whole records."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from alembic import command
from prometheus_client import CollectorRegistry

from benchmarks.bench_forward import ThrowawayPostgres
from service.records.central.forwarder import Forwarder, ForwardError
from service.records.central.schema import (
    CentralSchemaError,
    _config,
    current_revision,
    head_revision,
    prune_before,
    upgrade,
)
from tests.service.records.central.helpers import T0, add_records, central_counts, settings


def test_upgrade_is_idempotent(central_dsn: str) -> None:
    upgrade(central_dsn)
    with psycopg.connect(central_dsn) as conn:
        assert current_revision(conn) == head_revision()
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"inspections", "detections", "images", "alembic_version"} <= tables


def test_an_unmigrated_database_is_a_schema_failure_unless_migrate_is_on(
    postgres: ThrowawayPostgres, tmp_path: Path
) -> None:
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS bare WITH (FORCE)")
        conn.execute("CREATE DATABASE bare")
    dsn = postgres.dsn("bare")
    add_records(tmp_path, 4)
    registry = CollectorRegistry()
    with pytest.raises(ForwardError) as info:
        Forwarder(settings(dsn), tmp_path, registry).forward_once()
    assert info.value.reason == "schema" and "never migrated" in info.value.message
    assert registry.get_sample_value("aoi_forward_failures_total", {"reason": "schema"}) == 1
    fwd = Forwarder(settings(dsn, migrate=True), tmp_path)
    assert fwd.forward_once() == 4
    fwd.stop()


def test_upgrade_failure_names_no_password(postgres: ThrowawayPostgres) -> None:
    wrong = postgres.dsn().replace(postgres.password, "Sup3r-secret")
    with pytest.raises(CentralSchemaError) as info:
        upgrade(wrong)
    assert "Sup3r-secret" not in str(info.value) and "password authentication failed" in str(info.value)


def test_prune_before_deletes_old_records_with_their_detections(central_dsn: str, tmp_path: Path) -> None:
    add_records(tmp_path, 12)
    fwd = Forwarder(settings(central_dsn), tmp_path)
    fwd.forward_once()
    fwd.stop()
    with psycopg.connect(central_dsn, autocommit=True) as conn:
        with pytest.raises(ValueError):
            prune_before(conn, datetime(2026, 1, 1))
        assert prune_before(conn, datetime.fromtimestamp(T0 + 6, UTC), batch=4) == 6
        images = conn.execute("SELECT count(*) FROM images").fetchone()
    # left: rec-6..rec-11, of which rec-6 (scratch + pit) and rec-9 (scratch) are NG
    assert central_counts(central_dsn, "st-1") == (6, 6, 3)
    assert images == (2,)


def test_c0002_adds_the_missing_image_state_to_a_c0001_database(postgres: ThrowawayPostgres, tmp_path: Path) -> None:
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS old_images WITH (FORCE)")
        conn.execute("CREATE DATABASE old_images")
    dsn = postgres.dsn("old_images")
    command.upgrade(_config(dsn), "c0001")
    add_records(tmp_path, 4)  # rec-0 and rec-3 are NG, archived: two pending image rows
    with psycopg.connect(dsn) as conn:
        assert current_revision(conn) == "c0001"
    upgrade(dsn)
    fwd = Forwarder(settings(dsn), tmp_path)
    assert fwd.forward_once() == 4
    fwd.stop()
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert current_revision(conn) == head_revision() == "c0003"
        conn.execute("UPDATE images SET state = 'missing' WHERE seq = 1")
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE images SET state = 'lost' WHERE seq = 4")
    command.downgrade(_config(dsn), "c0001")  # missing becomes pending again: the old code knows no other state
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT array_agg(state ORDER BY seq) FROM images").fetchone() == (["pending", "pending"],)
