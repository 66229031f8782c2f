"""The service as a real process (`python -m service`): kill -9 at random moments under load loses no acknowledged
record or NG image (durable mode); SIGTERM answers what was admitted, flushes and exits within its bound; SIGHUP
reloads the served bundle. Signals go to real processes here, never to the test runner."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.service.processes import Load, check_records, ng_bundle, service_process
from tests.synthetic import make_image_bytes

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_kill_9_under_load_loses_no_acknowledged_record_or_ng_image(tmp_path: Path) -> None:
    bundle, data, log = ng_bundle(tmp_path / "bundle"), tmp_path / "data", tmp_path / "service.log"
    rng = random.Random(13)
    acked: dict[str, str] = {}
    cycles = 20
    for cycle in range(cycles):
        with service_process(bundle, data, log, records__durability="durable") as (proc, url):
            load = Load(url)
            load.start(f"c{cycle}")
            time.sleep(rng.uniform(0.2, 1.2))  # a random moment under load
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            load.join()
        assert any(s == 200 for s in load.statuses), f"cycle {cycle}: no request answered: {load.statuses[:20]}"
        assert set(load.statuses) <= {200, "ConnectError", "ReadError", "RemoteProtocolError", "WriteError"}
        acked.update(load.acked)
    check_records(data, acked)
    assert len(acked) >= cycles
    print(f"{cycles} kill -9 cycles: {len(acked)} acknowledged requests, every one recorded with its NG image")


def test_sigterm_answers_what_was_admitted_flushes_and_exits_in_time(tmp_path: Path) -> None:
    bundle, data, log = ng_bundle(tmp_path / "bundle"), tmp_path / "data", tmp_path / "service.log"
    stop_ms = 8000
    with service_process(bundle, data, log, records__durability="fast", stop_timeout_ms=str(stop_ms)) as (proc, url):
        load = Load(url, clients=6)
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
    check_records(data, load.acked)  # fast mode: the shutdown flushed every record still pending
    text = log.read_text()
    assert "stopped in" in text and "Traceback" not in text


def test_sighup_reloads_the_served_bundle_in_a_runningservice_process(tmp_path: Path) -> None:
    bundle, data, log = ng_bundle(tmp_path / "line"), tmp_path / "data", tmp_path / "service.log"
    with service_process(bundle, data, log) as (proc, url):
        staging = ng_bundle(tmp_path / "staging", "2.0.0", 0.3)
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
