"""The service as a real process (`python -m service` on 127.0.0.1) for the tests that kill, stop or signal it:
start it until ready, load it with clients sending distinct NG images, and check what it recorded."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.server import free_port
from service.core.bundle import load_bundle, write_bundle
from service.records.query import RecordReader
from service.records.schema import DB_NAME, open_reader
from tests.synthetic import make_image_bytes, make_synthetic_bundle

__all__ = ["Load", "check_records", "ng_bundle", "service_process"]


def ng_bundle(root: Path, version: str = "1.0.0", threshold: float = 0.05) -> Path:
    """The synthetic bundle with a threshold so low that every image has detections: every verdict is NG, so
    every answered image must also have its archived image."""
    make_synthetic_bundle(root, threshold=threshold)
    write_bundle(load_bundle(root).model_copy(update={"version": version}), root)
    return root


@contextmanager
def service_process(
    bundle: Path, data: Path, log: Path, *, port: int | None = None, **settings: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """The service on 127.0.0.1:``port`` (default a free one) with ``settings`` as ``AOI_*`` variables, ready; killed
    at the end if it still runs."""
    port = port or free_port()
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
class Load:
    """Clients sending distinct images, each with its own request id, until stopped; what each got back. Each client
    waits ``pause_s`` after every answer (0: a closed loop at full speed)."""

    url: str
    clients: int = 4
    pause_s: float = 0.0
    acked: dict[str, str] = field(default_factory=dict)  # request id -> sha256 of the image, for every 200
    statuses: list[int | str] = field(default_factory=list)
    failed: dict[str, tuple[int | str, float]] = field(default_factory=dict)  # request id -> (status, seconds taken)
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
                t0 = time.monotonic()
                try:
                    r = client.post("/v1/inspect", content=body, headers={"content-type": "image/png",
                                                                          "x-request-id": rid})  # fmt: skip
                except httpx.HTTPError as exc:
                    self.statuses.append(type(exc).__name__)
                    self.failed[rid] = (type(exc).__name__, time.monotonic() - t0)
                    if self.stop.wait(0.02):
                        return
                    continue
                self.statuses.append(r.status_code)
                if r.status_code == 200:
                    assert r.json()["verdict"] == "NG"
                    self.acked[rid] = hashlib.sha256(body).hexdigest()
                else:
                    self.failed[rid] = (r.status_code, time.monotonic() - t0)
                if self.pause_s and self.stop.wait(self.pause_s):
                    return

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)


def check_records(data: Path, acked: dict[str, str]) -> None:
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
