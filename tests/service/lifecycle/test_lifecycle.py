"""The service as a real process (`python -m service`): kill -9 at random moments under load loses no acknowledged
record or NG image (durable mode); SIGTERM answers what was admitted, flushes and exits within its bound; SIGHUP
reloads the served bundle. Signals go to real processes here, never to the test runner."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from benchmarks.server import free_port
from service.core.bundle import load_bundle, write_bundle
from service.records.query import RecordReader
from service.records.schema import DB_NAME, open_reader
from tests.synthetic import make_image_bytes, make_synthetic_bundle

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _bundle(root: Path, version: str = "1.0.0", threshold: float = 0.05) -> Path:
    """The synthetic bundle with a threshold so low that every image has detections: every verdict is NG, so
    every answered image must also have its archived image."""
    make_synthetic_bundle(root, threshold=threshold)
    write_bundle(load_bundle(root).model_copy(update={"version": version}), root)
    return root


@contextmanager
def _service(bundle: Path, data: Path, log: Path, **settings: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AOI_")}
    env.update({"AOI_DATA_DIR": str(data), "AOI_BACKEND": "onnxruntime-cpu", "AOI_MAX_DELAY_MS": "0",
                "AOI_DECODE_WORKERS": "2", **{f"AOI_{k.upper()}": v for k, v in settings.items()}})  # fmt: skip
    cmd = [sys.executable, "-m", "service", "--bundle", str(bundle), "--host", "127.0.0.1", "--port", str(port)]
    with log.open("ab") as out:
        proc = subprocess.Popen([*cmd, "--log-format", "text"], env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        t_end = time.monotonic() + 60
        while time.monotonic() < t_end:
            assert proc.poll() is None, f"service exited with {proc.returncode}: {log.read_text()[-2000:]}"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        else:
            raise AssertionError(f"service not ready: {log.read_text()[-2000:]}")
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@dataclass
class _Load:
    """Clients sending distinct images, each with its own request id, until stopped; what each got back."""

    url: str
    clients: int = 4
    acked: dict[str, str] = field(default_factory=dict)  # request id -> sha256 of the image, for every 200
    statuses: list[int | str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, tag: str) -> None:
        for c in range(self.clients):
            t = threading.Thread(target=self._run, args=(f"{tag}-{c}",), daemon=True)
            t.start()
            self.threads.append(t)

    def _run(self, prefix: str) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                rid = f"{prefix}-{n}"
                body = make_image_bytes(64, 64, "png", seed=hash(rid) % 2**32)
                try:
                    r = client.post("/v1/inspect", content=body, headers={"content-type": "image/png",
                                                                          "x-request-id": rid})  # fmt: skip
                except httpx.HTTPError as exc:
                    self.statuses.append(type(exc).__name__)
                    if self.stop.wait(0.02):
                        return
                    continue
                self.statuses.append(r.status_code)
                if r.status_code == 200:
                    assert r.json()["verdict"] == "NG"
                    self.acked[rid] = hashlib.sha256(body).hexdigest()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)


def _check_records(data: Path, acked: dict[str, str]) -> None:
    """Every acknowledged request has its record, NG, with its image on disk matching its sha256; the database and
    every kept file pass the integrity check."""
    conn = open_reader(data / DB_NAME)
    try:
        reader = RecordReader(conn, data)
        missing, bad_images = [], []
        for rid, sha in acked.items():
            rows = reader.get(rid)
            if len(rows) != 1 or rows[0]["verdict"] != "NG" or rows[0]["image_sha256"] != sha:
                missing.append(rid)
                continue
            path = data / rows[0]["image"]["path"]
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != sha:
                bad_images.append(rid)
        assert missing == [] and bad_images == [], (len(missing), len(bad_images), len(acked))
        assert reader.integrity_check() == []
    finally:
        conn.close()


def test_kill_9_under_load_loses_no_acknowledged_record_or_ng_image(tmp_path: Path) -> None:
    bundle, data, log = _bundle(tmp_path / "bundle"), tmp_path / "data", tmp_path / "service.log"
    rng = random.Random(13)
    acked: dict[str, str] = {}
    cycles = 20
    for cycle in range(cycles):
        with _service(bundle, data, log, records__durability="durable") as (proc, url):
            load = _Load(url)
            load.start(f"c{cycle}")
            time.sleep(rng.uniform(0.2, 1.2))  # a random moment under load
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            load.join()
        assert any(s == 200 for s in load.statuses), f"cycle {cycle}: no request answered: {load.statuses[:20]}"
        assert set(load.statuses) <= {200, "ConnectError", "ReadError", "RemoteProtocolError", "WriteError"}
        acked.update(load.acked)
    _check_records(data, acked)
    assert len(acked) >= cycles
    print(f"{cycles} kill -9 cycles: {len(acked)} acknowledged requests, every one recorded with its NG image")


def test_sigterm_answers_what_was_admitted_flushes_and_exits_in_time(tmp_path: Path) -> None:
    bundle, data, log = _bundle(tmp_path / "bundle"), tmp_path / "data", tmp_path / "service.log"
    stop_ms = 8000
    with _service(bundle, data, log, records__durability="fast", stop_timeout_ms=str(stop_ms)) as (proc, url):
        load = _Load(url, clients=6)
        load.start("term")
        time.sleep(1.0)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(stop_ms / 1000 + 5)
        took = time.monotonic() - t0
        load.join()
    assert code == 0, log.read_text()[-2000:]
    assert took < stop_ms / 1000, took
    # Answered, refused as shutting down, or not connected any more: never a 5xx of ours, never a 200 unrecorded.
    assert set(load.statuses) <= {200, 503, "ConnectError", "ReadError", "RemoteProtocolError", "WriteError"}
    assert sum(s == 200 for s in load.statuses) > 0
    _check_records(data, load.acked)  # fast mode: the shutdown flushed every record still pending
    text = log.read_text()
    assert "stopped in" in text and "Traceback" not in text


def test_sighup_reloads_the_served_bundle_in_a_running_service(tmp_path: Path) -> None:
    bundle, data, log = _bundle(tmp_path / "line"), tmp_path / "data", tmp_path / "service.log"
    with _service(bundle, data, log) as (proc, url):
        staging = _bundle(tmp_path / "staging", "2.0.0", 0.3)
        for f in staging.iterdir():
            (bundle / f.name).write_bytes(f.read_bytes())
        proc.send_signal(signal.SIGHUP)
        t_end = time.monotonic() + 30
        while time.monotonic() < t_end and httpx.get(f"{url}/v1/model").json()["version"] != "2.0.0":
            time.sleep(0.1)
        info = httpx.get(f"{url}/v1/model").json()
        assert info["version"] == "2.0.0" and info["swaps"][-1]["trigger"] == "sighup"
        r = httpx.post(f"{url}/v1/inspect", content=make_image_bytes(64, 64, "png"),
                       headers={"content-type": "image/png", "x-request-id": "after-hup"})  # fmt: skip
        assert r.status_code == 200 and r.json()["model_version"] == "2.0.0"
        record = httpx.get(f"{url}/v1/inspections/after-hup").json()["images"][0]
        assert record["model_version"] == "2.0.0" and record["model_hash"] == info["bundle_hash"]
        # the server froze its warm heap at startup and, the old model retired, collects and freezes it again
        t_end = time.monotonic() + 30
        while time.monotonic() < t_end and "heap refrozen after retiring a model" not in log.read_text():
            time.sleep(0.1)
        text = log.read_text()
        assert "startup heap frozen:" in text and "heap refrozen after retiring a model" in text
