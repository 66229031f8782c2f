"""Central records fixtures: a throwaway PostgreSQL for the session (tests that stop the server get their own), a
freshly migrated database per test, station journals written with the service's own SQLite schema, and an S3
emulator (moto's server mode, ``moto.server.ThreadedMotoServer`` on 127.0.0.1: no AWS account or network)."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from moto.server import ThreadedMotoServer

from benchmarks.bench_forward import ThrowawayPostgres, find_pg_bin, free_port

_SKIP = "PostgreSQL's initdb/pg_ctl not found on PATH or in /usr/lib/postgresql/*/bin (.ci/run installs postgresql)"
_numbers = itertools.count()


@pytest.fixture(scope="session")
def pg_bin() -> Path:
    bindir = find_pg_bin()
    if bindir is None:
        pytest.skip(_SKIP)
    return bindir


@pytest.fixture(scope="session")
def postgres(pg_bin: Path) -> Iterator[ThrowawayPostgres]:
    server = ThrowawayPostgres(pg_bin, fsync=False)
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def own_postgres(pg_bin: Path) -> Iterator[ThrowawayPostgres]:
    """A server of this test's own, for tests that stop and restart it."""
    server = ThrowawayPostgres(pg_bin, fsync=False)
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def central_dsn(postgres: ThrowawayPostgres, request: pytest.FixtureRequest) -> str:
    """A new database on the session's server, migrated to the central schema."""
    name = f"t{next(_numbers)}_{re.sub(r'[^a-z0-9]+', '_', request.node.name.lower())}"[:60]
    return postgres.create_database(name)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials and region in the environment, where boto3's default chain finds them (moto accepts any)."""
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def s3_url() -> Iterator[str]:
    """The URL of an S3 emulator for the session: moto's server mode on a free port of 127.0.0.1."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
