"""The service with ``central`` on, against a real PostgreSQL: every answered image reaches the central store once, with
the station's identity; the station keeps answering while the central store is down and catches up after; the status
route and the metrics say so without the DSN; ``aoi records export|stats --db`` read the plant."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import psycopg
import pytest
from pydantic import SecretStr

from aoi.cli import main
from benchmarks.bench_forward import ThrowawayPostgres
from service.core.bundle import ModelBundle
from service.settings import CentralStoreSettings, RecordsSettings, Settings
from tests.service.conftest import FakeBackend, serve
from tests.service.records.central.helpers import central_counts

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _ng_frame(seed: int) -> bytes:
    """A black 64x48 frame with a red patch: the synthetic model's class 0 (NG) there."""
    img = np.zeros((48, 64, 3), np.uint8)
    x = 4 + seed % 30
    img[10:30, x : x + 20] = (0, 0, 255)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return bytes(buf)


def _settings(tmp_path: Path, dsn: str | None = None, dsn_file: Path | None = None, **central: Any) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        records=RecordsSettings(durability="durable"),
        station_id="line3-a",
        line_id="line3",
        central=CentralStoreSettings(
            dsn=SecretStr(dsn) if dsn else None,
            dsn_file=dsn_file,
            **({"poll_interval_s": 0.05} | central),
            min_backoff_s=0.05,
            max_backoff_s=0.2,
            connect_timeout_s=2,
        ),
    )


async def _inspect(client: httpx.AsyncClient, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        r = await client.post(
            "/v1/inspect", content=_ng_frame(i), headers={"content-type": "image/png", "x-request-id": f"req-{i}"},
            params={"camera_id": f"cam-{i % 2}"},
        )  # fmt: skip
        assert r.status_code == 200, r.text


async def _until(check: object, timeout_s: float = 15.0) -> None:
    end = time.monotonic() + timeout_s
    while not await asyncio.to_thread(check):  # type: ignore[arg-type]
        assert time.monotonic() < end, "not reached in time"
        await asyncio.sleep(0.05)


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


async def test_answered_images_reach_the_central_store_once_with_the_station(
    tmp_path: Path, central_dsn: str, bundle: ModelBundle
) -> None:
    dsn_file = tmp_path / "central-dsn"
    dsn_file.write_text(central_dsn + "\n")
    password = central_dsn.split(":")[2].split("@")[0]
    async with serve(_settings(tmp_path, dsn_file=dsn_file), bundle=bundle, backend=FakeBackend(bundle)) as client:
        await _inspect(client, 12)
        await _until(lambda: central_counts(central_dsn, "line3-a")[0] == 12)
        station = (await client.get("/v1/station")).json()
        metrics = (await client.get("/metrics")).text
    assert station["station_id"] == "line3-a" and station["line_id"] == "line3"
    assert station["central"]["forwarder"]["backlog"] == 0 and station["central"]["forwarder"]["connected"]
    assert password not in json.dumps(station) and password not in metrics
    assert _metric(metrics, "aoi_forward_records_total") == 12 and _metric(metrics, "aoi_forward_connected") == 1
    records, seqs, detections = central_counts(central_dsn, "line3-a")
    assert (records, seqs) == (12, 12) and detections >= 12  # one red patch each: at least one detection
    with psycopg.connect(central_dsn) as conn:
        rows = conn.execute("SELECT DISTINCT station_id, line_id, verdict FROM inspections").fetchall()
        ids = {r[0] for r in conn.execute("SELECT request_id FROM inspections").fetchall()}
    assert rows == [("line3-a", "line3", "NG")] and ids == {f"req-{i}" for i in range(12)}


async def test_the_line_keeps_inspecting_while_the_central_store_is_down(
    tmp_path: Path, own_postgres: ThrowawayPostgres, bundle: ModelBundle
) -> None:
    dsn = own_postgres.create_database("plant")
    async with serve(_settings(tmp_path, dsn), bundle=bundle, backend=FakeBackend(bundle)) as client:
        await _inspect(client, 5)
        await _until(lambda: central_counts(dsn, "line3-a")[0] == 5)
        await asyncio.to_thread(own_postgres.stop, "immediate")
        t0 = time.monotonic()
        await _inspect(client, 8, start=5)  # every answer a 200 while the central store is down
        down_s = time.monotonic() - t0
        assert (await client.get("/readyz")).status_code == 200
        end = time.monotonic() + 10  # the forwarder refreshes its backlog at each attempt (backoff <= 0.2 s here)
        while (forwarder := (await client.get("/v1/station")).json()["central"]["forwarder"])["backlog"] != 8:
            assert time.monotonic() < end, forwarder
            await asyncio.sleep(0.05)
        metrics = (await client.get("/metrics")).text
        assert forwarder["backlog"] == 8 and not forwarder["connected"] and forwarder["last_error"] is not None
        assert _metric(metrics, "aoi_forward_backlog_records") == 8
        assert own_postgres.password not in json.dumps(forwarder)
        await asyncio.to_thread(own_postgres.start)
        await _until(lambda: central_counts(dsn, "line3-a")[0] == 13)
        assert (await client.get("/v1/station")).json()["central"]["forwarder"]["backlog"] == 0
    records, seqs, _ = central_counts(dsn, "line3-a")
    assert records == seqs == 13  # nothing lost, nothing twice
    assert down_s < 10  # the answers did not wait for the central store


def test_aoi_records_reads_the_plant(
    tmp_path: Path, central_dsn: str, bundle: ModelBundle, capsys: pytest.CaptureFixture[str]
) -> None:
    async def fill() -> None:
        async with serve(_settings(tmp_path, central_dsn), bundle=bundle, backend=FakeBackend(bundle)) as client:
            await _inspect(client, 6)
            await _until(lambda: central_counts(central_dsn, "line3-a")[0] == 6)

    asyncio.run(fill())
    out = tmp_path / "plant.jsonl"
    assert main(["records", "export", "--db", central_dsn, "--format", "jsonl", "--out", str(out)]) == 0
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(docs) == 6 and {d["station_id"] for d in docs} == {"line3-a"}
    assert [d["request_id"] for d in docs] == [f"req-{i}" for i in reversed(range(6))]  # newest first
    assert main(["records", "export", "--db", central_dsn, "--format", "jsonl", "--camera-id", "cam-1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert main(["records", "stats", "--db", central_dsn, "--by", "station_id,camera_id", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted((r["camera_id"], r["total"], r["ng"]) for r in rows) == [("cam-0", 3, 3), ("cam-1", 3, 3)]
    bad = central_dsn.replace(central_dsn.split(":")[2].split("@")[0], "wrong-password")
    assert main(["records", "stats", "--db", bad]) == 2
    err = capsys.readouterr().err
    assert "wrong-password" not in err and "***" in err


async def test_the_plant_records_over_http(tmp_path: Path, central_dsn: str, bundle: ModelBundle) -> None:
    """``GET /v1/plant/inspections``: the central store's records with the station's filters, paginated; 404 while
    central is off; 503 central_unavailable (no DSN in it) when the central store does not answer."""
    async with serve(_settings(tmp_path, central_dsn), bundle=bundle, backend=FakeBackend(bundle)) as client:
        await _inspect(client, 5)
        await _until(lambda: central_counts(central_dsn, "line3-a")[0] == 5)
        page = (await client.get("/v1/plant/inspections", params={"limit": 3, "station_id": "line3-a"})).json()
        assert [i["request_id"] for i in page["items"]] == ["req-4", "req-3", "req-2"]
        rest = (await client.get("/v1/plant/inspections", params={"cursor": page["next_cursor"]})).json()
        assert [i["request_id"] for i in rest["items"]] == ["req-1", "req-0"] and rest["next_cursor"] is None
        cam = (await client.get("/v1/plant/inspections", params={"camera_id": "cam-1"})).json()["items"]
        assert {i["camera_id"] for i in cam} == {"cam-1"} and len(cam) == 2
        assert all(i["station_id"] == "line3-a" and i["line_id"] == "line3" for i in cam)
        bad = await client.get("/v1/plant/inspections", params={"cursor": "nonsense"})
        assert bad.status_code == 422 and bad.json()["code"] == "invalid_query"
    down = _settings(tmp_path / "down", "postgresql://aoi:s3cret-pw@127.0.0.1:9/plant")
    async with serve(down, bundle=bundle, backend=FakeBackend(bundle)) as client:
        r = await client.get("/v1/plant/inspections")
        assert r.status_code == 503 and r.json()["code"] == "central_unavailable" and "s3cret-pw" not in r.text
        assert (await client.get("/readyz")).status_code == 200  # the line does not depend on the central store
    off = Settings(data_dir=tmp_path / "off")
    async with serve(off, bundle=bundle, backend=FakeBackend(bundle)) as client:
        r = await client.get("/v1/plant/inspections")
        assert r.status_code == 404 and r.json()["code"] == "central_disabled"
        assert (await client.get("/v1/station")).json()["central"] is None


async def test_a_graceful_stop_forwards_the_backlog_first(
    tmp_path: Path, central_dsn: str, bundle: ModelBundle
) -> None:
    """A 5 s poll interval: without the drain at stop, the last records would wait in the journal for the next
    start; with it, the central store has every one when the service has stopped."""
    async with serve(_settings(tmp_path, central_dsn, poll_interval_s=5.0), bundle=bundle,
                     backend=FakeBackend(bundle)) as client:  # fmt: skip
        await asyncio.sleep(0.3)  # the forwarder's first look (nothing yet), then it waits up to 5 s
        await _inspect(client, 7)
    assert central_counts(central_dsn, "line3-a")[0] == 7
