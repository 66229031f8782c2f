"""service/records/central/forwarder.py against a real PostgreSQL (a throwaway cluster, see conftest): exactly-once
forwarding, resends absorbed by the key, outages, two stations at once, kill -9, no secret in logs or state; the
thread on the service's sink base (stop within a bound while backing off), its backoff, the retention guard."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from prometheus_client import CollectorRegistry

from benchmarks.bench_forward import ThrowawayPostgres, free_port
from service.records.central.forwarder import (
    WATERMARK_FILE,
    Forwarder,
    ForwardError,
    read_acknowledged,
    station_backlog_guard,
)
from service.records.central.settings import redact_dsn
from service.records.central.thread import retry_backoff_s
from service.signals.sink import BASE_BACKOFF_S, SinkThread, backoff_s
from tests.service.records.central.helpers import (
    add_records,
    central_counts,
    journal_counts,
    settings,
    wait_until,
)

REPO = Path(__file__).resolve().parents[4]


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_forwards_every_record_once_with_detections_and_image_refs(central_dsn: str, tmp_path: Path) -> None:
    add_records(tmp_path, 25)
    registry = CollectorRegistry()
    fwd = Forwarder(settings(central_dsn, batch_size=10), tmp_path, registry)
    assert [fwd.forward_once() for _ in range(4)] == [10, 10, 5, 0]
    fwd.stop()
    assert central_counts(central_dsn, "st-1") == (25, 25, journal_counts(tmp_path)[1])
    with psycopg.connect(central_dsn) as conn:
        row = conn.execute(
            """SELECT line_id, request_id, verdict, camera_id, extract(epoch FROM received_at)::float8, tiled,
                   timings_ms FROM inspections WHERE station_id = 'st-1' AND seq = 7"""
        ).fetchone()
        assert row == ("line-A", "rec-6", "NG", "cam-0", 1_767_225_606.0, False,
                       {"decode": 1.5, "inference": 7.25, "total": 10.0})  # fmt: skip
        classes = conn.execute("SELECT class_name FROM detections WHERE seq = 7 ORDER BY ordinal").fetchall()
        assert [c[0] for c in classes] == ["scratches", "pitted_surface"]
        images = conn.execute("SELECT seq, object_key, state FROM images ORDER BY seq").fetchall()
    assert [i[0] for i in images] == [s + 1 for s in range(0, 25, 3)]  # the NG ones, archived
    assert images[2] == (7, "st-1/2026/01/01/rec-6-0-7.jpg", "pending")  # request_id-index-seq
    assert fwd.acknowledged_seq() == 25 == read_acknowledged(tmp_path, "st-1")
    assert json.loads((tmp_path / WATERMARK_FILE).read_text())["acknowledged_seq"] == 25
    assert _sample(registry, "aoi_forward_batches_total") == 3
    assert _sample(registry, "aoi_forward_records_total") == 25
    assert _sample(registry, "aoi_forward_backlog_records") == 0
    assert fwd.state()["backlog"] == 0 and fwd.state()["watermark"] is None  # stopped: disconnected


def test_resends_after_a_crash_between_commit_and_watermark_are_absorbed(central_dsn: str, tmp_path: Path) -> None:
    add_records(tmp_path, 30)
    fwd = Forwarder(settings(central_dsn, batch_size=20), tmp_path)
    assert fwd.forward_once() == 20 and fwd.forward_once() == 10
    # As if the commit of seq 11..30 had happened but the station died before learning it: it sends them again.
    fwd._watermark = 10
    assert fwd.forward_once() == 20
    fwd.stop()
    assert central_counts(central_dsn, "st-1") == (30, 30, journal_counts(tmp_path)[1])
    # The watermark file lost (or stale): a new forwarder reads central's watermark and sends nothing again.
    (tmp_path / WATERMARK_FILE).unlink()
    again = Forwarder(settings(central_dsn, batch_size=20), tmp_path)
    assert again.acknowledged_seq() is None
    assert again.forward_once() == 0
    assert again.acknowledged_seq() == 30
    add_records(tmp_path, 5, start=30)
    assert again.forward_once() == 5
    again.stop()
    assert central_counts(central_dsn, "st-1")[:2] == (35, 35)


def test_postgres_outage_grows_the_backlog_then_drains(own_postgres: ThrowawayPostgres, tmp_path: Path) -> None:
    dsn = own_postgres.create_database("outage")
    add_records(tmp_path, 20)
    registry = CollectorRegistry()
    fwd = Forwarder(settings(dsn, batch_size=8, min_backoff_s=0.05, max_backoff_s=0.3, poll_interval_s=0.05,
                             connect_timeout_s=2), tmp_path, registry)  # fmt: skip
    fwd.start()
    try:
        wait_until(lambda: fwd.acknowledged_seq() == 20, what="first 20 forwarded")
        assert _sample(registry, "aoi_forward_connected") == 1
        own_postgres.stop()
        add_records(tmp_path, 30, start=20)
        fwd.wake()
        wait_until(lambda: _sample(registry, "aoi_forward_backlog_records") == 30, what="backlog of 30")
        wait_until(lambda: fwd.state()["consecutive_failures"] >= 2, what="failures")
        state = fwd.state()
        assert state["connected"] is False and state["last_error"]["reason"] in ("connect", "write")
        failed = sum(_sample(registry, "aoi_forward_failures_total", reason=r) for r in ("connect", "write"))
        assert failed >= 2
        assert _sample(registry, "aoi_forward_oldest_unforwarded_seconds") > 0
        assert _sample(registry, "aoi_forward_connected") == 0
        own_postgres.start()
        assert fwd.wait_drained(15.0)
        assert _sample(registry, "aoi_forward_connected") == 1
    finally:
        assert fwd.stop(5.0)
    assert central_counts(dsn, "st-1") == (50, 50, journal_counts(tmp_path)[1])
    assert _sample(registry, "aoi_forward_backlog_records") == 0
    assert fwd.state()["last_error"] is not None and fwd.state()["consecutive_failures"] == 0


def test_two_stations_forward_into_one_database_at_once(central_dsn: str, tmp_path: Path) -> None:
    dirs = {sid: tmp_path / sid for sid in ("st-a", "st-b")}
    for d in dirs.values():
        add_records(d, 300)
    errors: list[BaseException] = []

    def run(station_id: str) -> None:
        try:
            fwd = Forwarder(settings(central_dsn, station_id, batch_size=40), dirs[station_id])
            while fwd.forward_once():
                pass
            fwd.stop()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(sid,)) for sid in dirs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for sid, d in dirs.items():
        assert central_counts(central_dsn, sid) == (300, 300, journal_counts(d)[1])


_CHILD = """
import os, sys, time
from pathlib import Path
from pydantic import SecretStr
from service.records.central.forwarder import Forwarder
from service.records.central.settings import CentralSettings
settings = CentralSettings(dsn=SecretStr(os.environ["CENTRAL_DSN"]), station_id="k9", batch_size=37)
fwd = Forwarder(settings, Path(sys.argv[1]))
while True:
    shipped = fwd.forward_once()
    print(fwd.acknowledged_seq(), flush=True)
    if not shipped:
        time.sleep(0.005)
"""


def test_kill_9_mid_forward_loses_and_duplicates_nothing(central_dsn: str, tmp_path: Path) -> None:
    rng = random.Random(9)
    total = 0
    env = {**os.environ, "CENTRAL_DSN": central_dsn}
    for cycle in range(20):  # the 20 kill -9 cycles
        total = add_records(tmp_path, 150, start=cycle * 150)
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], cwd=REPO, env=env,
                                 stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert child.stdout is not None
            for _ in range(rng.randint(1, 6)):  # a few acknowledged batches, then die somewhere in the next
                assert child.stdout.readline(), "the forwarder child exited"
            time.sleep(rng.uniform(0, 0.02))
        finally:
            child.kill()  # SIGKILL
            child.wait(10)
    fwd = Forwarder(settings(central_dsn, "k9", batch_size=500), tmp_path)
    while fwd.forward_once():
        pass
    fwd.stop()
    assert central_counts(central_dsn, "k9") == (total, total, journal_counts(tmp_path)[1])
    with psycopg.connect(central_dsn) as conn:
        seqs = [r[0] for r in conn.execute("SELECT seq FROM inspections WHERE station_id = 'k9' ORDER BY seq")]
    assert seqs == list(range(1, total + 1))


def test_the_dsn_password_never_reaches_logs_errors_or_state(
    central_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    password = central_dsn.split(":")[2].split("@")[0]
    add_records(tmp_path, 3)
    good = Forwarder(settings(central_dsn), tmp_path)
    assert good.forward_once() == 3
    good.stop()
    wrong = central_dsn.replace(password, "Wr0ng-s3cret")
    malformed = "host=127.0.0.1 port=notaport password='Wr0ng-s3cret' dbname"
    for dsn in (wrong, malformed):
        fwd = Forwarder(settings(dsn, connect_timeout_s=2), tmp_path)
        with pytest.raises(ForwardError) as info:
            fwd.forward_once()
        assert info.value.reason == "connect"
        assert "Wr0ng-s3cret" not in str(info.value) and info.value.__cause__ is None
        assert "Wr0ng-s3cret" not in json.dumps(fwd.state())
        assert fwd.state()["last_error"]["reason"] == "connect"
    assert password not in caplog.text and "Wr0ng-s3cret" not in caplog.text
    assert "***" in caplog.text  # the connect line names the server, redacted


def test_redact_dsn_masks_every_form() -> None:
    assert redact_dsn("postgresql://aoi:p%40ss@db:5432/plant") == "postgresql://aoi:***@db:5432/plant"
    assert redact_dsn("postgresql://db/plant?user=aoi&password=pw1&sslmode=require") == (
        "postgresql://db/plant?user=aoi&password=***&sslmode=require"
    )
    assert redact_dsn("host=db password='a b\\'c' user=aoi") == "host=db password=*** user=aoi"
    assert redact_dsn("host=db user=aoi") == "host=db user=aoi"


def test_the_thread_is_a_sink_and_stops_within_its_bound_while_backing_off(tmp_path: Path) -> None:
    add_records(tmp_path, 3)
    registry = CollectorRegistry()
    nowhere = f"postgresql://aoi:pw@127.0.0.1:{free_port()}/plant"  # nothing listens there
    fwd = Forwarder(settings(nowhere, min_backoff_s=60.0, max_backoff_s=120.0, poll_interval_s=0.05,
                             connect_timeout_s=2), tmp_path, registry)  # fmt: skip
    assert isinstance(fwd, SinkThread)
    fwd.start()
    fwd.start()  # a no-op while it runs
    try:
        wait_until(lambda: fwd.state()["consecutive_failures"] >= 1, what="a failed attempt")
        # backing off for a minute: the backlog gauges stay current meanwhile, and the stop is not held up
        wait_until(lambda: _sample(registry, "aoi_forward_backlog_records") == 3, what="backlog gauge")
        assert _sample(registry, "aoi_forward_connected") == 0
        assert _sample(registry, "aoi_forward_failures_total", reason="connect") == 1
    finally:
        started = time.monotonic()
        assert fwd.stop(5.0)
    assert time.monotonic() - started < 2.0 and not fwd.alive


def test_retry_backoff_follows_the_shared_helper_within_min_and_max() -> None:
    # below the shared base: exactly the service's backoff (same random draws), capped at max
    a, b = random.Random(1), random.Random(1)
    assert [retry_backoff_s(n, 0.05, 1.0, a) for n in range(1, 9)] == [backoff_s(n, 1.0, b) for n in range(8)]
    # above it: entered at the first doubling that reaches min (0.5 s -> 0.8 s), never below min nor above max
    rng = random.Random(2)
    for failures in range(1, 40):
        wait = retry_backoff_s(failures, 0.5, 60.0, rng)
        nominal = min(60.0, BASE_BACKOFF_S * 2 ** (failures - 1 + 2))
        assert max(0.5, nominal / 2) <= wait <= nominal
    assert retry_backoff_s(50, 0.5, 60.0, rng) >= 30.0  # capped at max, jittered to at least half of it
    assert retry_backoff_s(1, 5.0, 2.0, rng) == 2.0  # a min above max: max wins


def test_station_backlog_guard_is_the_acknowledged_watermark(central_dsn: str, tmp_path: Path) -> None:
    assert station_backlog_guard(tmp_path, "st-1") is None  # never forwarded: nothing may be pruned
    add_records(tmp_path, 12)
    fwd = Forwarder(settings(central_dsn, batch_size=5), tmp_path)
    assert fwd.forward_once() == 5
    assert station_backlog_guard(tmp_path, "st-1") == 5 == fwd.acknowledged_seq()
    while fwd.forward_once():
        pass
    fwd.stop()
    assert station_backlog_guard(tmp_path, "st-1") == 12
    assert station_backlog_guard(tmp_path, "st-other") is None  # another station's watermark guards nothing here
