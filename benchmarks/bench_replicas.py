"""Several replicas on one machine behind nginx: goodput of one replica direct against two behind nginx, and a
rolling restart of every replica under load.

    python -m benchmarks.bench_replicas --image frame.jpg [--bundle bundles/default --clients 16 --seconds 8
                                        --rounds 3 --rate 40]

nginx (the Debian package's binary, run as this user in the foreground) is configured from
``deploy/nginx/nginx.conf.template``; the replicas are ``aoi serve`` subprocesses on 127.0.0.1, each with its own port,
``data_dir`` journal and ``station_id``, all forwarding to one throwaway PostgreSQL (initdb + pg_ctl in a temporary
folder), the shared record store.

Goodput: rounds alternate (order rotating) one replica served directly and two replicas behind nginx, each at
saturation (``--clients`` closed-loop keep-alive clients, every request a different image) after a warm-up; printed
per phase: images/s answered 200, p50/p99, and the answers that were not 200. The ratio two-behind-nginx / one-direct
is the median of the per-round ratios (adjacent phases, so the machine's drift cancels). Target (issue 25): >= 0.9 on
this 2-core machine, where both replicas share the cores one replica already saturates.

Rolling restart: an open-loop load of ``--rate`` images/s through nginx while each replica in turn gets SIGTERM,
drains and exits, is started again and waits for /readyz, and nginx sends it requests again. Printed: answers that
were not 200 (target 0), and after the forwarders caught up, the 200 answers whose request id is not in the central
PostgreSQL exactly once (target 0 lost, 0 twice).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import psycopg

from benchmarks.bench_forward import ThrowawayPostgres, find_pg_bin
from benchmarks.bench_records import closed_loop_phase, variants
from benchmarks.loadgen import HttpLoadClient, LoadClientError
from benchmarks.server import free_port, log_tail, start_service, wait_ready
from service.records.schema import DB_NAME

__all__ = ["Nginx", "find_nginx", "nginx_skip_reason", "render_nginx_conf"]

TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "nginx.conf.template"


def find_nginx() -> Path | None:
    """nginx on PATH, else where the Debian package puts it (/usr/sbin, off a normal user's PATH)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    return Path(found) if found else None


def nginx_skip_reason() -> str | None:
    """Why nginx cannot run here (None when it can)."""
    if find_nginx() is None:
        return "nginx not found on PATH or in /usr/sbin (.ci/run installs the Debian package nginx)"
    return None


def _version(binary: Path) -> tuple[int, ...]:
    """nginx's version from ``nginx -v`` (``nginx version: nginx/1.22.1``)."""
    done = subprocess.run([str(binary), "-v"], capture_output=True, text=True, timeout=30)
    found = re.search(r"nginx/(\d+(?:\.\d+)*)", done.stderr + done.stdout)
    return tuple(int(x) for x in found[1].split(".")) if found else (0,)


def render_nginx_conf(listen: str, replicas: Sequence[str], template: Path = TEMPLATE) -> str:
    """The template with ``${LISTEN}`` filled and its ``${REPLICA}`` line repeated once per replica address."""
    if not replicas:
        raise ValueError("at least one replica")
    lines = []
    for line in template.read_text().splitlines():
        if "${REPLICA}" in line:
            lines += [line.replace("${REPLICA}", address) for address in replicas]
        else:
            lines.append(line.replace("${LISTEN}", listen))
    text = "\n".join(lines) + "\n"
    left = sorted(set(re.findall(r"\$\{[A-Z_]+\}", text)))
    if left:
        raise ValueError(f"{template}: placeholders not filled: {left}")
    return text


class Nginx:
    """nginx in the foreground on 127.0.0.1:``port`` in front of ``replicas`` (``host:port``), its prefix (config,
    logs, temporary files) in a temporary folder. Use as a context manager; :meth:`access_log` reads what it served."""

    def __init__(self, replicas: Sequence[str], port: int | None = None) -> None:
        binary = find_nginx()
        if binary is None:
            raise RuntimeError(nginx_skip_reason())
        self.binary = binary
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.prefix = Path(tempfile.mkdtemp(prefix="aoi-nginx-"))
        self.prefix.chmod(0o755)  # started as root, nginx's workers run as nobody and write their temporary files here
        (self.prefix / "logs").mkdir()
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(render_nginx_conf(f"127.0.0.1:{self.port}", replicas))
        self.proc: subprocess.Popen[bytes] | None = None

    def _command(self, *extra: str) -> list[str]:
        pid = self.prefix / "nginx.pid"
        cmd = [str(self.binary), "-p", f"{self.prefix}/", "-c", str(self.conf), "-g", f"daemon off; pid {pid};"]
        if _version(self.binary) >= (1, 19, 5):  # -e: the log of startup errors too (else the compiled-in path)
            cmd += ["-e", "logs/error.log"]
        return [*cmd, *extra]

    def check(self) -> None:
        """``nginx -t`` on the rendered configuration. Raises RuntimeError with nginx's words."""
        done = subprocess.run(self._command("-t"), capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"nginx -t failed: {done.stderr.strip()}")

    def start(self, timeout_s: float = 10.0) -> None:
        self.check()
        self.proc = subprocess.Popen(self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}: {self.error_log()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.05)
        raise RuntimeError(f"nginx not listening on {self.port} after {timeout_s} s: {self.error_log()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: the requests under way are answered
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def error_log(self) -> str:
        path = self.prefix / "logs" / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def access_log(self) -> list[dict[str, Any]]:
        """One dict per request served (the template's JSON ``log_format``), oldest first."""
        path = self.prefix / "logs" / "access.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def __enter__(self) -> Nginx:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.prefix, ignore_errors=True)


class Replica:
    """One ``aoi serve`` subprocess on a port of its own (nginx's upstream names it), restartable."""

    def __init__(self, bundle: Path, root: Path, index: int, dsn: str) -> None:
        self.bundle, self.port, self.station_id = bundle, free_port(), f"bench-replica-{index}"
        self.address = f"127.0.0.1:{self.port}"
        self.settings = {"DATA_DIR": str(root / f"replica-{index}"), "CENTRAL__DSN": dsn, "STATION_ID": self.station_id}
        self.log: IO[bytes] = (root / f"replica-{index}.log").open("w+b")
        self.client = HttpLoadClient("127.0.0.1", self.port, max_connections=260)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = start_service(self.bundle, self.port, self.log, self.settings)
        self.client = HttpLoadClient("127.0.0.1", self.port, max_connections=260)

    async def ready(self) -> None:
        assert self.proc is not None
        await wait_ready(self.client, self.proc, self.log)

    async def terminate(self) -> int:
        """SIGTERM, then wait for the drain and the exit; the exit code."""
        assert self.proc is not None
        await self.client.close()  # else the drain waits for its idle keep-alive connections to time out
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.proc.wait, 60)

    async def backlog(self) -> int:
        status, body = await self.client.get("/v1/station")
        if status != 200:
            raise RuntimeError(f"{self.address} /v1/station: {status} {body[:200]!r}")
        return int(json.loads(body)["central"]["forwarder"]["backlog"])

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)
        self.log.close()


async def served_again(nginx: Nginx, replica: Replica, since: int, timeout_s: float = 30.0) -> None:
    """Until nginx's access log shows a 200 ``replica`` answered after its first ``since`` entries."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if any(e["upstream_addr"] == replica.address and e["status"] == 200 for e in nginx.access_log()[since:]):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"nginx sent nothing to {replica.address} within {timeout_s:.0f} s: {nginx.error_log()[-2000:]}")


async def goodput(args: argparse.Namespace, direct: HttpLoadClient, balanced: HttpLoadClient, bodies: list[bytes],
                  ctype: str) -> dict[str, Any]:  # fmt: skip
    """Interleaved rounds at saturation: one replica direct, then two behind nginx (the order alternates)."""
    clients = {"1 replica direct": direct, "2 replicas + nginx": balanced}
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in clients}
    sent = 0
    for r in range(args.rounds):
        for name in list(clients) if r % 2 == 0 else list(clients)[::-1]:
            sent += (await closed_loop_phase(clients[name], bodies, ctype, args.clients, args.warmup, sent))["sent"]
            result = await closed_loop_phase(clients[name], bodies, ctype, args.clients, args.seconds, sent)
            sent += result["sent"]
            rounds[name].append(result)
            print(f"round {r + 1} {name:18s} {result['goodput']:6.1f} images/s  p50 {result['p50_ms']:6.1f} ms  "
                  f"p99 {result['p99_ms']:6.1f} ms  errors {sum(result['other'].values())} {result['other']}",
                  flush=True)  # fmt: skip
    one, two = rounds["1 replica direct"], rounds["2 replicas + nginx"]
    ratios = [b["goodput"] / a["goodput"] for a, b in zip(one, two, strict=True)]
    summary = {
        name: {key: round(statistics.median(x[key] for x in results), 1) for key in ("goodput", "p50_ms", "p99_ms")}
        | {"errors": sum(sum(x["other"].values()) for x in results)}
        for name, results in rounds.items()
    }
    return {"phases": summary, "ratios": [round(x, 3) for x in ratios], "ratio_median": statistics.median(ratios)}


async def _paced(client: HttpLoadClient, bodies: list[bytes], ctype: str, rate: float, stop: asyncio.Event,
                 acked: list[str], failed: collections.Counter[str]) -> None:  # fmt: skip
    """``rate`` requests per second (open loop, each on its own task) until ``stop``: the request id of every 200,
    every other answer or error by kind."""
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int) -> None:
        try:
            status, body = await client.post(f"/v1/inspect?camera_id=roll&part_id=p{i}", bodies[i % len(bodies)], ctype)
        except (OSError, LoadClientError) as exc:
            failed[type(exc).__name__] += 1
            return
        if status == 200:
            acked.append(json.loads(body)["request_id"])
        else:
            failed[f"status {status}"] += 1

    t0, i = time.perf_counter(), 0
    while not stop.is_set():
        await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        task = asyncio.create_task(one(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
    await asyncio.gather(*tasks)


async def rolling_restart(args: argparse.Namespace, replicas: list[Replica], nginx: Nginx, bodies: list[bytes],
                          ctype: str) -> dict[str, Any]:  # fmt: skip
    """Each replica in turn under ``--rate`` images/s through nginx: SIGTERM, drain and exit, start, /readyz, and
    nginx sending it requests again before the next one."""
    client = HttpLoadClient("127.0.0.1", nginx.port, max_connections=256)
    stop, acked, failed = asyncio.Event(), list[str](), collections.Counter[str]()
    sender = asyncio.create_task(_paced(client, bodies, ctype, args.rate, stop, acked, failed))
    steps = []
    try:
        await asyncio.sleep(2.0)
        for r in replicas:
            t0 = time.monotonic()
            code = await r.terminate()
            drained = time.monotonic() - t0
            r.start()
            await r.ready()
            ready = time.monotonic() - t0
            await served_again(nginx, r, len(nginx.access_log()))  # else nginx may count it down when the next stops
            steps.append({"replica": r.station_id, "exit_code": code, "drained_s": round(drained, 2),
                          "ready_s": round(ready, 2), "served_again_s": round(time.monotonic() - t0, 2)})  # fmt: skip
            print(
                f"restarted {r.station_id}: exit {code}, drained and exited in {drained:.2f} s, ready after "
                f"{ready:.2f} s, served by nginx again after {steps[-1]['served_again_s']:.2f} s",
                flush=True,
            )
        await asyncio.sleep(2.0)
    finally:
        stop.set()
        await sender
        await client.close()
    not_200 = [e for e in nginx.access_log() if e["status"] != 200]
    for entry in not_200[:10]:  # what nginx saw of each error, and why (its error log)
        print(f"not 200: {entry}")
    for line in nginx.error_log().splitlines():
        if "[error]" in line and "Connection refused" not in line:
            print(f"nginx: {line}")
    return {"rate": args.rate, "steps": steps, "answered_200": len(acked), "errors": dict(failed), "acked": acked}


def central_counts(dsn: str) -> dict[str, int]:
    """request id -> how many central records carry it (every station)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT request_id, count(*) FROM inspections GROUP BY request_id").fetchall()
    return {r[0]: int(r[1]) for r in rows}


def _journal_count(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / DB_NAME) as conn:
        return int(conn.execute("SELECT count(*) FROM inspections").fetchone()[0])


async def caught_up(replicas: list[Replica], dsn: str, timeout_s: float = 60.0) -> None:
    """Until every replica's forwarder says it has nothing left and central holds as many of its records as its
    journal."""
    end = time.monotonic() + timeout_s
    for r in replicas:
        journal = _journal_count(Path(r.settings["DATA_DIR"]))
        while True:
            with psycopg.connect(dsn) as conn:
                row = conn.execute("SELECT count(*) FROM inspections WHERE station_id = %s", [r.station_id]).fetchone()
            if await r.backlog() == 0 and row is not None and row[0] == journal:
                break
            if time.monotonic() > end:
                raise RuntimeError(f"{r.station_id}: central holds {row} of {journal} records after {timeout_s:.0f} s")
            await asyncio.sleep(0.2)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    bindir = find_pg_bin()
    if bindir is None:
        raise SystemExit("PostgreSQL's initdb/pg_ctl not found (apt-get install postgresql)")
    if (reason := nginx_skip_reason()) is not None:
        raise SystemExit(reason)
    ctype = "image/png" if args.image.suffix.lower() == ".png" else "image/jpeg"
    bodies = variants(args.image, args.variants)
    tmp = Path(tempfile.mkdtemp(prefix="aoi-bench-replicas-"))
    pg = ThrowawayPostgres(bindir, fsync=False)
    pg.start()
    replicas: list[Replica] = []
    try:
        dsn = pg.create_database("plant")
        replicas = [Replica(args.bundle, tmp, i, dsn) for i in range(2)]
        for r in replicas:
            r.start()
        for r in replicas:
            await r.ready()
        with Nginx([r.address for r in replicas]) as nginx:
            balanced = HttpLoadClient("127.0.0.1", nginx.port, max_connections=args.clients + 4)
            report = {}
            if args.rounds > 0:
                report["goodput"] = await goodput(args, replicas[0].client, balanced, bodies, ctype)
            await balanced.close()
            report["rolling"] = await rolling_restart(args, replicas, nginx, bodies, ctype)
        await caught_up(replicas, dsn)
        central = central_counts(dsn)
        acked = report["rolling"].pop("acked")
        report["rolling"]["lost"] = sum(1 for rid in acked if rid not in central)
        report["rolling"]["twice"] = sum(1 for n in central.values() if n > 1)
        for r in replicas:
            if r.proc is None or r.proc.poll() is not None:
                raise RuntimeError(f"{r.station_id} died: {log_tail(r.log)}")
    finally:
        for r in replicas:
            await r.client.close()
            r.close()
        pg.destroy()
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, required=True, help="a frame as the line sends it (JPEG or PNG)")
    parser.add_argument("--bundle", type=Path, default=Path("bundles/default"))
    parser.add_argument("--clients", type=int, default=16, help="closed-loop clients (about saturation)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per phase and round")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each phase")
    parser.add_argument("--rounds", type=int, default=3, help="goodput rounds (0: the rolling restart only)")
    parser.add_argument("--rate", type=float, default=40.0, help="images/s sent through nginx during the restarts")
    parser.add_argument("--variants", type=int, default=4000, help="distinct images, sent in turn")
    parser.add_argument("--json", type=Path, default=None, help="write the report here too")
    args = parser.parse_args(argv)
    if not args.image.is_file():
        parser.error(f"--image {args.image}: no such file")
    report = asyncio.run(run(args))
    print_report(report, args.rounds)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def print_report(report: dict[str, Any], rounds: int) -> None:
    if "goodput" in report:
        g = report["goodput"]
        head = f"medians of {rounds} rounds"
        print(f"\n{head:20s} {'images/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>7s}")
        for name, p in g["phases"].items():
            print(f"{name:20s} {p['goodput']:9.1f} {p['p50_ms']:8.1f} {p['p99_ms']:8.1f} {p['errors']:7d}")
        print(f"2 replicas + nginx / 1 replica: {g['ratio_median']:.3f} (target >= 0.9; per round {g['ratios']})")
    roll = report["rolling"]
    errors = sum(roll["errors"].values())
    print(f"rolling restart of {len(roll['steps'])} replicas at {roll['rate']:.0f} images/s: {roll['answered_200']} "
          f"answered 200, {errors} errors {roll['errors']} (target 0); lost records {roll['lost']}, recorded twice "
          f"{roll['twice']} (target 0)")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
