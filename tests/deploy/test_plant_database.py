"""The plant records' database side on a real PostgreSQL (a throwaway cluster, as the central records tests use):
the central schema migrated by its owner, then ``deploy/postgres/roles.sql`` run with psql exactly as docs/deploy.md
tells operators to. As ``aoi_station`` the service's real forwarder ships two stations' journals, and nothing beyond
its grants is possible; as ``aoi_grafana`` every SQL panel of the Plant dashboard runs (Grafana's macro expansion)
and returns rows, and nothing can be written. A database without the roles' grants would fail here, not in the
plant."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.deploy.stack import ROLES_SQL, plant_queries

psycopg = pytest.importorskip("psycopg", reason="psycopg not installed: pip install -e '.[dev]' (or the plant extra)")
errors = psycopg.errors

from pydantic import SecretStr  # noqa: E402

from benchmarks.bench_forward import (  # noqa: E402  (needs psycopg)
    ThrowawayPostgres,
    find_pg_bin,
    synthetic_records,
    write_journal,
)
from service.records.central.forwarder import Forwarder  # noqa: E402
from service.records.central.settings import CentralSettings  # noqa: E402

pytestmark = pytest.mark.integration

DATABASE = "aoi_central"  # POSTGRES_DB of the compose stack's postgres service
STATIONS = {"line-a-st1": "line-a", "line-b-st1": "line-b"}
RECORDS = 240  # per station, one second apart, ending now


@dataclass(frozen=True)
class Central:
    server: ThrowawayPostgres
    owner: str  # DSNs
    station: str
    grafana: str
    shipped: dict[str, int]  # station id -> records the forwarder reported shipped
    journals: dict[str, int]  # station id -> max seq written to its journal


def _dsn(server: ThrowawayPostgres, user: str, password: str) -> str:
    return f"postgresql://{user}:{password}@127.0.0.1:{server.port}/{DATABASE}"


def _psql() -> str | None:
    bindir = find_pg_bin()
    return shutil.which("psql") or (str(bindir / "psql") if bindir and (bindir / "psql").is_file() else None)


def _run_roles_sql(server: ThrowawayPostgres, station_pw: str, grafana_pw: str) -> subprocess.CompletedProcess[str]:
    """deploy/postgres/roles.sql through psql as docs/deploy.md runs it (stdin, ON_ERROR_STOP, the two variables)."""
    psql = _psql()
    assert psql is not None
    env = {**os.environ, "PGPASSWORD": server.password}
    cmd = [psql, "-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres", "-d", DATABASE, "-X", "-q"]
    cmd += ["-v", "ON_ERROR_STOP=1", "-v", f"station_password={station_pw}", "-v", f"grafana_password={grafana_pw}"]
    return subprocess.run(
        cmd, stdin=ROLES_SQL.open(encoding="utf-8"), capture_output=True, text=True, timeout=60, env=env, check=False
    )


@pytest.fixture(scope="module")
def central(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Central]:
    bindir = find_pg_bin()
    if bindir is None or _psql() is None:
        pytest.skip("PostgreSQL's initdb/pg_ctl/psql not found (.ci/run installs Debian's postgresql)")
    server = ThrowawayPostgres(bindir, fsync=False)
    try:
        server.start()
        owner = server.create_database(DATABASE)  # migrated to head by the owner, as the docs' one-off command does
        station_pw, grafana_pw = secrets.token_hex(12), secrets.token_hex(12)
        for attempt in range(2):  # re-running it (after a migration, to change passwords) must work too
            done = _run_roles_sql(server, station_pw, grafana_pw)
            assert done.returncode == 0, f"roles.sql run {attempt + 1}: {done.stderr}"
        station = _dsn(server, "aoi_station", station_pw)
        shipped, journals = {}, {}
        end = time.time()
        for i, (station_id, line_id) in enumerate(STATIONS.items()):
            data_dir = tmp_path_factory.mktemp(station_id)
            records = synthetic_records(RECORDS, seed=i, start=end - RECORDS)
            journals[station_id] = write_journal(data_dir, records, archive_ng=True)
            settings = CentralSettings(
                dsn=SecretStr(station), station_id=station_id, line_id=line_id, batch_size=100, migrate=False
            )
            forwarder = Forwarder(settings, data_dir)
            try:
                total = 0
                while shipped_now := forwarder.forward_once():
                    total += shipped_now
            finally:
                forwarder.stop()
            shipped[station_id] = total
        yield Central(server, owner, station, _dsn(server, "aoi_grafana", grafana_pw), shipped, journals)
    finally:
        server.destroy()


def test_the_station_role_forwards_whole_journals(central: Central) -> None:
    """The grants are enough for the real forwarder: schema check, watermark, temporary staging tables, inserts."""
    assert central.shipped == {s: RECORDS for s in STATIONS}
    with psycopg.connect(central.owner) as conn:
        rows = dict(conn.execute("SELECT station_id, max(seq) FROM inspections GROUP BY station_id").fetchall())
        lines = dict(conn.execute("SELECT DISTINCT station_id, line_id FROM inspections").fetchall())
        detections = conn.execute("SELECT count(*) FROM detections").fetchone()
        images = conn.execute("SELECT count(*) FROM images").fetchone()
    assert rows == central.journals
    assert lines == STATIONS
    assert detections and detections[0] > 0
    assert images and images[0] > 0  # NG records with an archived image


def test_the_station_role_cannot_rewrite_or_erase_records(central: Central) -> None:
    with psycopg.connect(central.station, autocommit=True) as conn:
        # what the NG image upload does: settle its own images rows (those columns only)
        conn.execute(
            "UPDATE images SET state = 'stored', object_key = 'k', bytes = 1, stored_at = now() "
            "WHERE station_id = 'nobody' AND state = 'pending'"
        )
        forbidden = [
            "UPDATE inspections SET verdict = 'OK' WHERE verdict = 'NG'",
            "UPDATE images SET sha256 = 'x' WHERE station_id = 'nobody'",
            "DELETE FROM inspections WHERE station_id = 'line-a-st1'",
            "DELETE FROM detections",
            "TRUNCATE images",
            "CREATE TABLE public.scratch (x int)",
            "DROP TABLE inspections",
            "ALTER TABLE inspections ADD COLUMN x int",
            "INSERT INTO alembic_version VALUES ('zzz')",
        ]
        for sql in forbidden:
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(sql)


def test_the_grafana_role_runs_every_plant_panel_and_writes_nothing(central: Central) -> None:
    end = datetime.now(UTC) + timedelta(minutes=1)
    start = end - timedelta(days=7)
    with psycopg.connect(central.grafana, autocommit=True) as conn:
        for query in plant_queries():
            cur = conn.execute(query.expanded(start, end))
            rows = cur.fetchall()
            assert rows, f"{query.panel}: no rows over the forwarded records"
            names = [c.name for c in cur.description or []]
            if query.format == "time_series":
                assert names[0] == "time" and "metric" in names and "value" in names, (query.panel, names)
                stamps = [r[0] for r in rows]
                assert stamps == sorted(stamps), f"{query.panel}: Grafana needs time series rows in time order"
        ng_rate = {q.panel: q for q in plant_queries()}["NG rate per line, per hour"]
        by_metric = conn.execute(ng_rate.expanded(start, end)).fetchall()
        assert {r[1] for r in by_metric} == set(STATIONS.values())
        assert all(0.0 <= r[2] <= 1.0 for r in by_metric)
        writes = [
            "INSERT INTO inspections (station_id) VALUES ('x')",
            "DELETE FROM inspections",
            "CREATE TEMP TABLE t ()",
        ]
        for sql in writes:
            with pytest.raises((errors.InsufficientPrivilege, errors.ReadOnlySqlTransaction)):
                conn.execute(sql)


def test_other_roles_cannot_connect(central: Central) -> None:
    """roles.sql takes CONNECT away from PUBLIC: a login role without a grant cannot open the central database."""
    password = secrets.token_hex(8)
    with psycopg.connect(central.owner, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE someone_else LOGIN PASSWORD '{password}'")
    with pytest.raises(psycopg.OperationalError, match="permission denied"):
        psycopg.connect(_dsn(central.server, "someone_else", password)).close()


def test_roles_sql_is_the_file_the_docs_run() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "deploy.md").read_text(encoding="utf-8")
    assert "deploy/postgres/roles.sql" in docs
    assert "station_password=" in docs and "grafana_password=" in docs
