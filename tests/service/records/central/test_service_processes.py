"""Forwarding stations as real processes (`python -m service`) against a real PostgreSQL: kill -9 of a station at
random moments under load, 20 times, loses and duplicates no record in the central store; two stations with
different ids forward to one database at once. Signals go to the service processes, never to the test runner."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.service.processes import Load, check_records, ng_bundle, service_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _central(dsn: str, station_id: str) -> dict[str, int]:
    """request id -> how many central records carry it, for ``station_id``."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT request_id, count(*) FROM inspections WHERE station_id = %s GROUP BY request_id", [station_id]
        ).fetchall()
    return {r[0]: int(r[1]) for r in rows}


def _forwarded(url: str, dsn: str, station_id: str, data: Path, timeout_s: float = 60.0) -> None:
    """Wait until the central store holds as many of the station's records as its journal (and the station says its
    backlog is 0)."""
    end = time.monotonic() + timeout_s
    while True:
        forwarder = httpx.get(f"{url}/v1/station", timeout=5).json()["central"]["forwarder"]
        if forwarder["backlog"] == 0 and sum(_central(dsn, station_id).values()) == _journal_count(data):
            return
        assert time.monotonic() < end, forwarder
        time.sleep(0.1)


def _journal_count(data: Path) -> int:
    import sqlite3

    with sqlite3.connect(data / "records.sqlite3") as conn:
        return int(conn.execute("SELECT count(*) FROM inspections").fetchone()[0])


def test_kill_9_of_a_forwarding_station_loses_and_duplicates_nothing(tmp_path: Path, central_dsn: str) -> None:
    bundle, data, log = ng_bundle(tmp_path / "bundle"), tmp_path / "data", tmp_path / "service.log"
    settings = {"records__durability": "durable", "central__dsn": central_dsn, "station_id": "k9-line",
                "central__poll_interval_s": "0.05"}  # fmt: skip
    rng = random.Random(24)
    acked: dict[str, str] = {}
    cycles = 20
    for cycle in range(cycles):
        with service_process(bundle, data, log, **settings) as (proc, url):
            load = Load(url)
            load.start(f"k{cycle}")
            time.sleep(rng.uniform(0.2, 1.2))  # a random moment under load, forwarding as it goes
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            load.join()
        assert any(s == 200 for s in load.statuses), f"cycle {cycle}: no request answered"
        acked.update(load.acked)
    with service_process(bundle, data, log, **settings) as (_, url):  # restarted: it resends what is unacknowledged
        _forwarded(url, central_dsn, "k9-line", data)
    check_records(data, acked)  # the station kept every acknowledged record (durable mode)
    central = _central(central_dsn, "k9-line")
    assert set(acked) <= set(central), len(set(acked) - set(central))  # every acknowledged record reached central
    assert set(central.values()) == {1}  # none twice
    assert sum(central.values()) == _journal_count(data)  # central holds exactly the journal
    print(f"{cycles} kill -9 cycles of a forwarding station: {len(acked)} acknowledged requests, "
          f"{sum(central.values())} central records, none lost, none twice")  # fmt: skip


def test_two_stations_forward_to_one_database_at_once(tmp_path: Path, central_dsn: str) -> None:
    bundle, log = ng_bundle(tmp_path / "bundle"), tmp_path / "service.log"
    common = {"records__durability": "durable", "central__dsn": central_dsn, "line_id": "line-7"}
    with (
        service_process(bundle, tmp_path / "a", log, station_id="line7-a", **common) as (_, url_a),
        service_process(bundle, tmp_path / "b", log, station_id="line7-b", **common) as (_, url_b),
    ):
        loads = [Load(url_a, clients=2), Load(url_b, clients=2)]
        for load, tag in zip(loads, ("a", "b"), strict=True):
            load.start(tag)
        time.sleep(2.0)
        for load in loads:
            load.join()
        _forwarded(url_a, central_dsn, "line7-a", tmp_path / "a")
        _forwarded(url_b, central_dsn, "line7-b", tmp_path / "b")
    for station, load, data in (("line7-a", loads[0], tmp_path / "a"), ("line7-b", loads[1], tmp_path / "b")):
        central = _central(central_dsn, station)
        assert load.acked and set(central) == set(load.acked)  # each station's records, and only its own
        assert set(central.values()) == {1} and sum(central.values()) == _journal_count(data)
    with psycopg.connect(central_dsn) as conn:
        lines = conn.execute("SELECT DISTINCT line_id FROM inspections").fetchall()
    assert lines == [("line-7",)]
