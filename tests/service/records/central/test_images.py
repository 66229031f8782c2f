"""service/records/central/images.py with real components: station journals and archived NG images written by the
service's own RecordStore into tmp data_dirs, forwarded by the Forwarder into a real PostgreSQL (conftest's
throwaway cluster), then uploaded by the ImageForwarder to moto's server mode (an S3 emulator on 127.0.0.1,
``moto.server.ThreadedMotoServer``, see conftest) or to a directory. Also: an S3 endpoint answering 500s then
recovering (an HTTP proxy in front of moto), and files the station's retention deleted before the upload."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import http.server
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import psycopg
import pytest
from prometheus_client import CollectorRegistry

from benchmarks.bench_forward import free_port
from service.records.central.forwarder import Forwarder
from service.records.central.images import ImageForwarder
from service.records.central.objects import DirectoryObjectStore, S3ObjectStore, object_key, object_store_from
from service.records.record import InspectionRecord
from service.records.store import RecordStore
from service.settings import ObjectStoreSettings, RecordsSettings
from service.signals.sink import SinkThread
from tests.service.records.central.helpers import settings, wait_until
from tests.service.records_helpers import make_image, make_record

DAY = 86400.0


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def write_station(data_dir: Path, items: list[tuple[InspectionRecord, bytes | None]], **records: Any) -> None:
    """Record ``items`` (with their images) through the service's RecordStore, durable, in one session."""

    async def run() -> None:
        store = RecordStore(RecordsSettings(**records), data_dir, sweep_interval_s=3600.0)
        store.start()
        try:
            await store.add(items)
        finally:
            await store.close(5.0)

    asyncio.run(run())


def station_items(now: float) -> list[tuple[InspectionRecord, bytes | None]]:
    """Four NG records with their own images, a client reusing request id ``dup`` (same index, same day, other
    bytes), two records of identical bytes (one archive file), and an OK record (not archived)."""
    same = make_image(50)
    images = {f"rec-{i}": make_image(i) for i in range(4)}
    items: list[tuple[InspectionRecord, bytes | None]] = [
        (make_record(rid, im, received_at=now + i), im) for i, (rid, im) in enumerate(images.items())
    ]
    items += [(make_record("dup", make_image(60), received_at=now + 10), make_image(60)),
              (make_record("dup", make_image(61), received_at=now + 11), make_image(61)),
              (make_record("same-a", same, received_at=now + 12), same),
              (make_record("same-b", same, received_at=now + 13), same),
              (make_record("ok", make_image(70), verdict="OK", received_at=now + 14), make_image(70))]  # fmt: skip
    return items


def forward_all(dsn: str, data_dir: Path, **kw: Any) -> None:
    fwd = Forwarder(settings(dsn, **kw), data_dir)
    while fwd.forward_once():
        pass
    assert fwd.stop(5.0)


def archived(data_dir: Path) -> dict[int, tuple[str, bytes]]:
    """seq -> (the record's archive path, the file's bytes) for every record with a live archived image."""
    with sqlite3.connect(data_dir / "records.sqlite3") as conn:
        rows = conn.execute(
            """SELECT i.seq, f.path FROM inspections i JOIN archive_files f ON f.id = i.image_file_id
               WHERE f.deleted_at IS NULL ORDER BY i.seq"""
        ).fetchall()
    return {int(seq): (str(path), (data_dir / path).read_bytes()) for seq, path in rows}


def central_images(dsn: str, station_id: str = "st-1") -> dict[int, tuple[str, str, str, int | None]]:
    """seq -> (state, object_key, sha256, bytes) of central's image rows."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT seq, state, object_key, sha256, bytes FROM images WHERE station_id = %s ORDER BY seq",
            [station_id],
        ).fetchall()
    return {int(r[0]): (r[1], r[2], r[3], r[4]) for r in rows}


def expected_key(data_dir: Path, seq: int, path: str) -> str:
    with sqlite3.connect(data_dir / "records.sqlite3") as conn:
        rid, index, received = conn.execute(
            "SELECT request_id, image_index, received_at FROM inspections WHERE seq = ?", [seq]
        ).fetchone()
    return object_key("st-1", received, rid, index, Path(path).suffix.lstrip("."), seq)


def assert_all_stored(dsn: str, data_dir: Path, read_object: Any) -> None:
    """Every archived image's central row is stored with its sha256, size and key, and the object's bytes are the
    archived file's."""
    files = archived(data_dir)
    rows = central_images(dsn)
    assert set(rows) == set(files) and len(files) == 8
    for seq, (path, data) in files.items():
        state, key, sha, size = rows[seq]
        assert (state, sha, size) == ("stored", hashlib.sha256(data).hexdigest(), len(data))
        assert key == expected_key(data_dir, seq, path) and key.endswith(f"-{seq}.jpg")
        assert read_object(key) == data
    assert len({r[1] for r in rows.values()}) == len(rows)  # one object per record, the reused request id too


@pytest.fixture
def bucket(s3_url: str, aws_env: None, request: pytest.FixtureRequest) -> str:
    name = "ng-" + hashlib.sha256(request.node.name.encode()).hexdigest()[:12]
    boto3.client("s3", endpoint_url=s3_url).create_bucket(Bucket=name)
    return name


def _s3_reader(s3_url: str, bucket: str, prefix: str) -> Any:
    client = boto3.client("s3", endpoint_url=s3_url)
    return lambda key: client.get_object(Bucket=bucket, Key=prefix + key)["Body"].read()


def test_images_are_uploaded_to_s3_verified_and_marked_stored(
    central_dsn: str, tmp_path: Path, s3_url: str, bucket: str
) -> None:
    data_dir = tmp_path / "station"
    write_station(data_dir, station_items(time.time()))
    forward_all(central_dsn, data_dir)
    assert {r[0] for r in central_images(central_dsn).values()} == {"pending"}
    objects = ObjectStoreSettings(kind="s3", bucket=bucket, prefix="plant-1", endpoint_url=s3_url, region="us-east-1")
    conf = settings(central_dsn, objects=objects)
    store = object_store_from(conf)
    assert isinstance(store, S3ObjectStore)
    registry = CollectorRegistry()
    up = ImageForwarder(conf, data_dir, store, registry, batch_size=3)
    assert [up.upload_once() for _ in range(4)] == [3, 3, 2, 0]
    assert up.stop(5.0)
    assert_all_stored(central_dsn, data_dir, _s3_reader(s3_url, bucket, "plant-1/"))
    head = store.client.head_object(Bucket=bucket, Key="plant-1/" + central_images(central_dsn)[1][1])
    assert head["Metadata"]["sha256"] == central_images(central_dsn)[1][2]
    assert _sample(registry, "aoi_forward_images_total", result="stored") == 8
    assert _sample(registry, "aoi_forward_images_total", result="failed") == 0
    assert _sample(registry, "aoi_forward_images_pending") == 0
    assert _sample(registry, "aoi_forward_images_pending_bytes") == 0
    assert up.state()["pending"] == 0 and up.state()["last_error"] is None


def test_threads_forward_records_then_images_to_a_directory(central_dsn: str, tmp_path: Path) -> None:
    data_dir, root = tmp_path / "station", tmp_path / "share"
    write_station(data_dir, station_items(time.time()))
    conf = settings(central_dsn, poll_interval_s=0.05, objects=ObjectStoreSettings(kind="dir", root=root))
    registry = CollectorRegistry()
    fwd = Forwarder(conf, data_dir, registry)
    up = ImageForwarder(conf, data_dir, DirectoryObjectStore(root), registry)
    fwd.start()
    up.start()
    try:
        assert fwd.wait_drained(15.0)
        assert up.wait_drained(15.0)
    finally:
        assert up.stop(5.0) and fwd.stop(5.0)
    assert not up.alive and not fwd.alive
    assert_all_stored(central_dsn, data_dir, lambda key: (root / key).read_bytes())
    assert _sample(registry, "aoi_forward_connected") == 0  # stopped: disconnected
    assert _sample(registry, "aoi_forward_images_total", result="stored") == 8


class _FlakyS3:
    """An HTTP proxy in front of the S3 emulator that answers 500 InternalError while ``failing`` is set."""

    def __init__(self, upstream: str) -> None:
        self.failing = True
        self.errors = 0
        host, port = upstream.removeprefix("http://").split(":")
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers botocore's Expect: 100-continue

            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if proxy.failing:
                    proxy.errors += 1
                    self._answer(500, {}, b"<Error><Code>InternalError</Code><Message>injected</Message></Error>")
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection")}
                conn = http.client.HTTPConnection(host, int(port), timeout=10)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    reply = conn.getresponse()
                    data = reply.read()
                    self._answer(reply.status, dict(reply.getheaders()), data)
                finally:
                    conn.close()

            def _answer(self, status: int, headers: dict[str, str], data: bytes) -> None:
                self.send_response(status)
                skip = ("content-length", "transfer-encoding", "connection", "server", "date")
                for k, v in headers.items():
                    if k.lower() not in skip:
                        self.send_header(k, v)
                length = headers.get("Content-Length", headers.get("content-length", str(len(data))))
                self.send_header("Content-Length", length if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_PUT = do_GET = do_HEAD = do_POST = _relay

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> _FlakyS3:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky_s3(s3_url: str) -> Iterator[_FlakyS3]:
    with _FlakyS3(s3_url) as proxy:
        yield proxy


def test_object_store_500s_then_recovery_loses_nothing_and_counts_retries(
    central_dsn: str, tmp_path: Path, s3_url: str, bucket: str, flaky_s3: _FlakyS3, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.records.central.images")
    data_dir = tmp_path / "station"
    write_station(data_dir, station_items(time.time()))
    forward_all(central_dsn, data_dir)
    objects = ObjectStoreSettings(kind="s3", bucket=bucket, endpoint_url=flaky_s3.url, region="us-east-1")
    conf = settings(central_dsn, min_backoff_s=0.02, max_backoff_s=0.1, poll_interval_s=0.05, objects=objects)
    store = object_store_from(conf)
    assert store is not None
    registry = CollectorRegistry()
    up = ImageForwarder(conf, data_dir, store, registry)
    files = archived(data_dir)
    up.start()
    try:
        wait_until(lambda: _sample(registry, "aoi_forward_images_total", result="failed") >= 3, what="3 failures")
        # the store is down: nothing is stored, the images wait and the pending gauges say how much
        assert {r[0] for r in central_images(central_dsn).values()} == {"pending"}
        assert _sample(registry, "aoi_forward_images_pending") == 8
        assert _sample(registry, "aoi_forward_images_pending_bytes") == sum(len(d) for _, d in files.values())
        assert up.state()["last_error"]["reason"] == "store" and "InternalError" in up.state()["last_error"]["message"]
        flaky_s3.failing = False
        assert up.wait_drained(15.0)
    finally:
        assert up.stop(5.0)
    assert_all_stored(central_dsn, data_dir, _s3_reader(s3_url, bucket, ""))
    # every 500 answered was one failed attempt, counted; each image was stored once
    assert _sample(registry, "aoi_forward_images_total", result="failed") == flaky_s3.errors >= 3
    assert _sample(registry, "aoi_forward_images_total", result="stored") == 8
    assert up.state()["consecutive_failures"] == 0
    assert "uploading again" in caplog.text


def test_files_gone_before_the_upload_are_marked_missing_not_retried(
    central_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.records.central.images")
    data_dir, root = tmp_path / "station", tmp_path / "share"
    now = time.time()
    old, gone, bad, new = (make_image(80 + i) for i in range(4))
    write_station(data_dir, [(make_record("old", old, received_at=now - 40 * DAY), old),
                             (make_record("gone", gone, received_at=now), gone),
                             (make_record("bad", bad, received_at=now + 1), bad),
                             (make_record("new", new, received_at=now + 2), new)])  # fmt: skip
    forward_all(central_dsn, data_dir)
    files = archived(data_dir)
    assert len(files) == 4 and {r[0] for r in central_images(central_dsn).values()} == {"pending"}
    (data_dir / files[2][0]).unlink()  # gone from disk by hand
    (data_dir / files[3][0]).write_bytes(b"not the bytes the record states")  # corrupt
    # the station's own retention (archive.retention_days 30 by default) deletes "old"'s file at its first sweep
    deleted = "SELECT count(*) FROM archive_files WHERE deleted_at IS NOT NULL AND deleted_reason = 'age'"

    async def sweep() -> None:
        store = RecordStore(RecordsSettings(), data_dir, sweep_interval_s=0.05)
        store.start()
        try:
            for _ in range(200):
                with sqlite3.connect(data_dir / "records.sqlite3") as conn:
                    if conn.execute(deleted).fetchone()[0]:
                        return
                await asyncio.sleep(0.02)
        finally:
            await store.close(5.0)

    asyncio.run(sweep())
    assert not (data_dir / files[1][0]).exists()
    registry = CollectorRegistry()
    up = ImageForwarder(settings(central_dsn), data_dir, DirectoryObjectStore(root), registry)
    assert up.upload_once() == 4
    assert up.upload_once() == 0  # settled: not retried
    up.stop()
    states = {seq: row[0] for seq, row in central_images(central_dsn).items()}
    assert states == {1: "missing", 2: "missing", 3: "missing", 4: "stored"}
    assert [p.name for p in root.rglob("*") if p.is_file()] == [Path(central_images(central_dsn)[4][1]).name]
    assert _sample(registry, "aoi_forward_images_total", result="missing") == 3
    assert _sample(registry, "aoi_forward_images_total", result="stored") == 1
    assert _sample(registry, "aoi_forward_images_total", result="failed") == 0
    assert _sample(registry, "aoi_forward_images_pending") == 0
    assert "corrupt" in caplog.text and "3 image(s) marked missing" in caplog.text


def test_the_uploader_is_a_sink_that_stops_within_its_bound_while_backing_off(tmp_path: Path) -> None:
    nowhere = f"postgresql://aoi:pw@127.0.0.1:{free_port()}/plant"  # central unreachable: nothing to upload yet
    conf = settings(nowhere, min_backoff_s=60.0, max_backoff_s=120.0, poll_interval_s=0.05, connect_timeout_s=2)
    registry = CollectorRegistry()
    up = ImageForwarder(conf, tmp_path, DirectoryObjectStore(tmp_path / "share"), registry)
    assert isinstance(up, SinkThread)
    up.start()
    try:
        wait_until(lambda: up.state()["consecutive_failures"] >= 1, what="a failed attempt")
        assert up.state()["last_error"]["reason"] == "central" and "pw" not in up.state()["last_error"]["message"]
    finally:
        started = time.monotonic()
        assert up.stop(5.0)
    assert time.monotonic() - started < 2.0 and not up.alive
    assert _sample(registry, "aoi_forward_images_total", result="failed") == 0  # no image was attempted
