"""Several replicas on one machine behind nginx (issue 25, part 3), all real processes: nginx (the Debian package's
binary, as this user, in the foreground) configured from ``deploy/nginx/nginx.conf.template``; ``python -m service``
replicas on their own ports, journals and station ids; a throwaway PostgreSQL as the plant's shared record store.

- Rolling restart at steady load: each replica in turn gets SIGTERM, drains and exits 0, is started again and waits
  for /readyz; no client request fails, and every 200 answer's request id is in the central store exactly once.
- kill -9 of one replica under load: the only failures are requests nginx had sent to the dead replica (a POST is
  never replayed), each answered 502 at once; nginx goes on serving from the other, and health GETs routed to the dead
  replica are retried on the other and succeed.

Signals go to the replicas, never to the test runner. docs/replicas.md says what the configuration guarantees."""

from __future__ import annotations

import collections
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

psycopg = pytest.importorskip("psycopg", reason="psycopg not installed: pip install -e '.[dev]' (or the plant extra)")

from benchmarks.bench_forward import ThrowawayPostgres, find_pg_bin  # noqa: E402  (needs psycopg)
from benchmarks.bench_replicas import Nginx, nginx_skip_reason  # noqa: E402
from benchmarks.server import free_port  # noqa: E402
from tests.service.processes import Load, ng_bundle, service_process  # noqa: E402
from tests.synthetic import make_image_bytes  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]
needs_nginx = pytest.mark.skipif(nginx_skip_reason() is not None, reason=nginx_skip_reason() or "")

DEADLINE_MS = 2000


class Replica:
    """One ``python -m service`` on a port of its own that survives restarts (nginx's upstream names it)."""

    def __init__(self, bundle: Path, root: Path, index: int, **settings: str) -> None:
        self.bundle, self.port, self.station_id = bundle, free_port(), f"replica-{index}"
        self.data, self.log = root / f"replica-{index}", root / f"replica-{index}.log"
        self.address = f"127.0.0.1:{self.port}"
        self.settings = {"station_id": self.station_id, "deadline_ms": str(DEADLINE_MS), **settings}
        self._stack = ExitStack()
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://{self.address}"

    def start(self) -> None:
        """Start it and wait until /readyz answers 200."""
        cm = service_process(self.bundle, self.data, self.log, port=self.port, **self.settings)
        self.proc, _ = self._stack.enter_context(cm)

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then wait for the drain and the exit; the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout_s)
        self._stack.close()
        return code

    def close(self) -> None:
        self._stack.close()  # kills it if it still runs


@contextmanager
def fleet(bundle: Path, root: Path, n: int, **settings: str) -> Iterator[tuple[list[Replica], Nginx]]:
    """``n`` replicas, ready, behind nginx."""
    replicas = [Replica(bundle, root, i, **settings) for i in range(n)]
    with ExitStack() as stack:
        for r in replicas:
            stack.callback(r.close)
        starting = [threading.Thread(target=r.start) for r in replicas]  # the warm-ups overlap
        for t in starting:
            t.start()
        for t in starting:
            t.join(120)
        assert all(r.proc is not None and r.proc.poll() is None for r in replicas), "a replica did not start"
        nginx = stack.enter_context(Nginx([r.address for r in replicas]))
        yield replicas, nginx


def wait_served_by(nginx: Nginx, replica: Replica, since: int = 0, timeout_s: float = 20.0) -> None:
    """Until nginx's access log shows a 200 that ``replica`` answered, after the first ``since`` entries (a restarted
    replica gets requests again once nginx's fail_timeout for it has passed)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        log = nginx.access_log()[since:]
        if any(e["upstream_addr"] == replica.address and e["status"] == 200 for e in log):
            return
        time.sleep(0.05)
    raise AssertionError(f"nginx sent no request to {replica.address} in {timeout_s} s: {nginx.error_log()[-2000:]}")


def wait_logged(
    nginx: Nginx, match: Callable[[dict[str, Any]], bool], since: int = 0, timeout_s: float = 15.0
) -> dict[str, Any]:
    """The first entry of nginx's access log after the first ``since`` that ``match`` accepts, once there is one."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        found = next((e for e in nginx.access_log()[since:] if match(e)), None)
        if found is not None:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no such request in nginx's log within {timeout_s} s")


@pytest.fixture(scope="module")
def postgres() -> Iterator[ThrowawayPostgres]:
    bindir = find_pg_bin()
    if bindir is None:
        pytest.skip(
            "PostgreSQL's initdb/pg_ctl not found on PATH or in /usr/lib/postgresql/*/bin (.ci/run installs it)"
        )
    server = ThrowawayPostgres(bindir, fsync=False)
    try:
        server.start()
        yield server
    finally:
        server.destroy()


def central_counts(dsn: str) -> dict[str, int]:
    """request id -> how many central records carry it (every station)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT request_id, count(*) FROM inspections GROUP BY request_id").fetchall()
    return {r[0]: int(r[1]) for r in rows}


def wait_forwarded(replica: Replica, dsn: str, timeout_s: float = 60.0) -> None:
    """Until the replica's forwarder has nothing left and central holds as many of its records as its journal."""
    import sqlite3

    with sqlite3.connect(replica.data / "records.sqlite3") as conn:
        journal = int(conn.execute("SELECT count(*) FROM inspections").fetchone()[0])
    end = time.monotonic() + timeout_s
    while True:
        backlog = httpx.get(f"{replica.url}/v1/station", timeout=5).json()["central"]["forwarder"]["backlog"]
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT count(*) FROM inspections WHERE station_id = %s", [replica.station_id]
            ).fetchone()
        if backlog == 0 and row is not None and row[0] == journal:
            return
        assert time.monotonic() < end, (replica.station_id, backlog, row, journal)
        time.sleep(0.1)


def test_a_draining_replica_refuses_new_connections_and_serves_what_open_ones_bring(tmp_path: Path) -> None:
    """What lets nginx move traffic off a replica without failing a request: on SIGTERM the listening socket closes
    (a new connection is refused: safe to send elsewhere, nothing was sent), while a request on a connection opened
    before is served, not refused (nginx may already have written it), and its answer closes that connection."""
    bundle = ng_bundle(tmp_path / "bundle")
    with service_process(bundle, tmp_path / "data", tmp_path / "service.log") as (proc, url):
        port = int(url.rsplit(":", 1)[1])
        with httpx.Client(base_url=url, timeout=10) as client:
            body = make_image_bytes(64, 64, "png", seed=1)
            first = client.post("/v1/inspect", content=body, headers={"content-type": "image/png"})
            assert first.status_code == 200 and first.headers.get("connection") != "close"
            proc.send_signal(signal.SIGTERM)
            end = time.monotonic() + 5
            while True:  # the listening socket closes within uvicorn's tick (0.1 s)
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except ConnectionRefusedError:
                    break
                assert time.monotonic() < end, "still accepting connections 5 s after SIGTERM"
                time.sleep(0.01)
            second = client.post("/v1/inspect", content=body, headers={"content-type": "image/png"})
        assert second.status_code == 200, second.text
        assert second.headers["connection"] == "close"
        assert proc.wait(20) == 0


@needs_nginx
def test_rolling_restart_at_steady_load_fails_no_request_and_loses_no_record(
    tmp_path: Path, postgres: ThrowawayPostgres
) -> None:
    dsn = postgres.create_database("replicas_rolling")
    bundle = ng_bundle(tmp_path / "bundle")
    central = {"records__durability": "durable", "central__dsn": dsn, "central__poll_interval_s": "0.05"}
    with fleet(bundle, tmp_path, 2, line_id="line-r", **central) as (replicas, nginx):
        load = Load(nginx.url, clients=3, pause_s=0.02)  # a steady load, well below saturation
        load.start("roll")
        for r in replicas:
            wait_served_by(nginx, r)
        for r in replicas:  # one at a time: the next only once nginx sends to the restarted one again
            assert r.terminate() == 0, r.log.read_text()[-2000:]
            r.start()
            wait_served_by(nginx, r, since=len(nginx.access_log()))
        load.join()
        for r in replicas:
            wait_forwarded(r, dsn)
        log = nginx.access_log()
    statuses = collections.Counter(load.statuses)
    assert set(statuses) == {200}, (statuses, load.failed, [e for e in log if e["status"] != 200][:10])
    assert all(e["status"] == 200 for e in log), [e for e in log if e["status"] != 200][:10]
    central_ids = central_counts(dsn)
    lost = [rid for rid in load.acked if rid not in central_ids]
    twice = {rid: n for rid, n in central_ids.items() if n != 1}
    assert lost == [] and twice == {}, (len(lost), twice)
    assert set(central_ids) == set(load.acked)  # and nothing the clients did not get a 200 for
    print(f"rolling restart of 2 replicas behind nginx: {statuses[200]} requests answered 200, 0 failed; "
          f"{len(central_ids)} central records, none lost, none twice")  # fmt: skip


@needs_nginx
def test_kill_9_of_one_replica_fails_only_its_requests_and_fast(tmp_path: Path) -> None:
    bundle = ng_bundle(tmp_path / "bundle")
    with fleet(bundle, tmp_path, 2, records__durability="fast") as (replicas, nginx):
        victim, survivor = replicas
        health = HealthChecks(nginx.url)
        load = Load(nginx.url, clients=4)  # a closed loop: requests in flight on both replicas at any time
        load.start("k9")
        health.start()
        for r in replicas:
            wait_served_by(nginx, r)
        time.sleep(1.0)  # steady load on both
        admin = httpx.post(f"{nginx.url}/v1/admin/rollback", timeout=5)  # per replica: not through the balancer
        assert admin.status_code == 403 and admin.json()["code"] == "admin_per_replica", admin.text
        big = make_image_bytes(1024, 1024, "png", seed=7)  # 2 MB: nginx buffers it in a file under its prefix
        r = httpx.post(f"{nginx.url}/v1/inspect", content=big, headers={"content-type": "image/png"}, timeout=30)
        assert r.status_code == 200, (r.status_code, r.text[:300], nginx.error_log()[-1000:])
        assert victim.proc is not None
        victim.proc.kill()
        victim.proc.wait(10)
        wait_served_by(nginx, survivor, since=len(nginx.access_log()))
        mark = len(nginx.access_log())  # from here on, every answer is the survivor's
        time.sleep(1.0)
        load.join()
        # Health checks alone: once nginx's fail_timeout (2 s) for the dead replica has passed, one of them tries it.
        retried = wait_logged(nginx, lambda e: e["uri"] == "/readyz" and victim.address in e["upstream_addr"], mark)
        health.join()
        log = nginx.access_log()
    by_id = {e["request_id"]: e for e in log if e["uri"].startswith("/v1/inspect")}
    assert load.acked and load.failed, "no request was on the killed replica"
    # Each client has one request outstanding at a time: at most one failure per client, the one it had in flight.
    clients = collections.Counter(rid.rsplit("-", 1)[0] for rid in load.failed)
    assert max(clients.values()) == 1, sorted(load.failed)
    for rid, (status, seconds) in load.failed.items():
        entry = by_id[rid]
        # nginx's own 502 for a POST the dead replica had taken: sent once, to it alone, and not replayed; or, when
        # the replica died while its answer was already streaming through nginx, the answer cut short (nginx can
        # only close the client's connection then): the same request, on the same replica, failing at once
        assert status in (502, "RemoteProtocolError") and entry["upstream_addr"] == victim.address, (rid, entry)
        assert seconds < DEADLINE_MS / 1000, (rid, seconds)  # failed at once, no hang up to a timeout
    after = [e for e in log[mark:] if e["uri"].startswith("/v1/inspect") and e["status"] == 200]
    assert after and {e["upstream_addr"].split(", ")[-1] for e in after} == {survivor.address}  # who answered
    assert set(health.statuses) == {200}, collections.Counter(health.statuses)
    # the health check that went to the dead replica was retried on the survivor and answered by it
    assert retried["status"] == 200 and retried["upstream_addr"] == f"{victim.address}, {survivor.address}", retried
    worst_ms = max((s for _, s in load.failed.values()), default=0) * 1e3
    print(f"kill -9 of one of 2 replicas under load: {len(load.failed)} requests failed (502, at most "
          f"{worst_ms:.0f} ms), {len(load.acked)} answered 200; {len(health.statuses)} health checks all 200, "
          f"those routed to the dead replica retried on the other")  # fmt: skip


class HealthChecks:
    """GET /readyz through nginx every 20 ms until joined; what each got."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.statuses: list[int | str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._stop.wait(0.02):
                try:
                    self.statuses.append(client.get("/readyz").status_code)
                except httpx.HTTPError as exc:
                    self.statuses.append(type(exc).__name__)

    def join(self) -> None:
        self._stop.set()
        self._thread.join(15)
