"""Forwarding a station journal to central PostgreSQL (records/s, COPY+staging vs executemany, both ON CONFLICT DO
NOTHING), one plant NG-rate question over 1,000,000 generated central rows (ms), and, with ``--images N``, uploading
N archived NG images to a directory object store (images/s: read, sha256, write + fsync, one UPDATE each).

    python -m benchmarks.bench_forward [--records 50000 --query-rows 1000000 --batch 1000 --images 0]

Starts its own throwaway PostgreSQL (initdb in a temporary folder, 127.0.0.1 on a free port, fsync on), which the
central tests reuse (:class:`ThrowawayPostgres`); needs Debian's ``postgresql`` package (``.ci/run`` installs it).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pwd
import random
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
from pydantic import SecretStr

from service.records.central.forwarder import Forwarder
from service.records.central.images import ImageForwarder
from service.records.central.journal import Batch
from service.records.central.objects import DirectoryObjectStore
from service.records.central.query import PlantFilters, ng_stats
from service.records.central.schema import upgrade
from service.records.central.settings import CentralSettings
from service.records.schema import DB_NAME, open_writer

CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")


def find_pg_bin() -> Path | None:
    """The folder with ``initdb`` and ``pg_ctl``: on PATH, else Debian's /usr/lib/postgresql/<newest>/bin."""
    on_path = shutil.which("initdb"), shutil.which("pg_ctl")
    if on_path[0] and on_path[1]:
        return Path(on_path[0]).parent
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True):
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThrowawayPostgres:
    """A private PostgreSQL cluster in a temporary folder: password auth over TCP on 127.0.0.1 (so DSNs carry a
    real secret), Unix socket in the folder. PostgreSQL refuses to run as root: as root the cluster belongs to the
    ``postgres`` system user (or ``nobody``) and its commands run through ``runuser``."""

    def __init__(self, bindir: Path, *, fsync: bool = True) -> None:
        self.bindir = bindir
        self.fsync = fsync
        self.password = "pw-" + secrets.token_hex(8)
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="aoi-pg-"))
        self.data = self.root / "data"
        self.user: str | None = None
        if os.geteuid() == 0:
            names = {p.pw_name for p in pwd.getpwall()}
            self.user = "postgres" if "postgres" in names else "nobody"
            shutil.chown(self.root, user=self.user)

    def _run(self, *args: str) -> None:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        done = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")

    def init(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password)
        if self.user:
            shutil.chown(pwfile, user=self.user)
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--pwfile", str(pwfile),
                  "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-sync")  # fmt: skip
        pwfile.unlink()

    def start(self) -> None:
        """Start the server (init first if needed) and wait until it accepts connections."""
        if not self.data.exists():
            self.init()
        opts = f"-k {self.root} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync={'on' if self.fsync else 'off'}"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w",
                  "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError):  # not running
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """A fresh database ``name`` (dropped first if it exists), migrated to the central schema; its DSN."""
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        upgrade(self.dsn(name))
        return self.dsn(name)


def write_journal(data_dir: Path, records: Iterable[Any], archive_ng: bool = False) -> int:
    """Append ``records`` (InspectionRecord, or anything with its attributes) to ``data_dir/records.sqlite3``
    (created by the service's own ``open_writer``) in one transaction, as the store's writer would; with
    ``archive_ng`` each NG record also gets a live archive file row (no file is written). Returns the max seq."""
    conn = open_writer(data_dir / DB_NAME, "NORMAL")
    try:
        conn.execute("BEGIN IMMEDIATE")
        for rec in records:
            file_id = None
            if archive_ng and rec.verdict == "NG":
                file_id = conn.execute(
                    """INSERT INTO archive_files (path, kind, sha256, bytes, created_at, last_seen_at)
                       VALUES (?, 'image', ?, ?, ?, ?)
                       ON CONFLICT (path) DO UPDATE SET last_seen_at = excluded.last_seen_at
                       RETURNING id""",
                    [f"images/{rec.image_sha256}.jpg", rec.image_sha256, rec.image_bytes, rec.received_at,
                     rec.received_at],
                ).fetchone()[0]  # fmt: skip
            seq = conn.execute(
                """INSERT INTO inspections (request_id, image_index, received_at, camera_id, part_id, filename,
                       model_name, model_version, model_hash, backend, precision, verdict, width, height, image_sha256,
                       image_bytes, tiled, tiles, timings_ms, image_file_id)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [rec.request_id, rec.image_index, rec.received_at, rec.camera_id, rec.part_id, rec.filename,
                 rec.model_name, rec.model_version, rec.model_hash, rec.backend, rec.precision, rec.verdict,
                 rec.width, rec.height, rec.image_sha256, rec.image_bytes, int(rec.tiled), rec.tiles,
                 json.dumps(rec.timings_ms), file_id],
            ).lastrowid  # fmt: skip
            conn.executemany(
                "INSERT INTO detections VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (seq, i, d["class_id"], d["class_name"], d["score"], *d["box_xyxy"])
                    for i, d in enumerate(rec.detections)
                ],
            )
        conn.execute("COMMIT")
        return int(conn.execute("SELECT coalesce(max(seq), 0) FROM inspections").fetchone()[0])
    finally:
        conn.close()


def synthetic_records(n: int, seed: int = 0, start: float = 1_750_000_000.0) -> Iterable[SimpleNamespace]:
    """``n`` records (InspectionRecord's attributes) one second apart, 0-3 detections each (NG when there is one)."""
    rng = random.Random(seed)
    for i in range(n):
        dets = []
        for _ in range(rng.randint(0, 3)):
            c = rng.randrange(len(CLASSES))
            x, y = rng.uniform(0, 600), rng.uniform(0, 600)
            dets.append({"class_id": c, "class_name": CLASSES[c], "score": round(rng.uniform(0.3, 1.0), 3),
                         "box_xyxy": [x, y, x + rng.uniform(4, 40), y + rng.uniform(4, 40)]})  # fmt: skip
        yield SimpleNamespace(
            request_id=f"req-{seed}-{i}", image_index=0, received_at=start + i, camera_id=f"cam-{i % 4}",
            part_id=f"P{i % 97}", filename=None, model_name="yolo11s.neu-det", model_version="1.4.0",
            model_hash="0123456789abcdef", backend="onnxruntime-cpu", precision="fp32",
            verdict="NG" if dets else "OK", detections=dets,
            timings_ms={"decode": 1.5, "inference": 7.25, "total": 10.0}, width=640, height=640,
            image_sha256=f"{i:064x}", image_bytes=50_000 + i % 1000, tiled=False, tiles=1,
        )  # fmt: skip


class ExecutemanyForwarder(Forwarder):
    """The strategy measured against COPY (and not kept in the service): pipelined ``executemany`` of
    ``INSERT ... ON CONFLICT DO NOTHING`` straight into the central tables."""

    def _write_batch(self, conn: psycopg.Connection[Any], batch: Batch) -> None:
        from service.records.central.forwarder import _TABLES

        with conn.transaction(), conn.cursor() as cur:
            for table, columns in _TABLES:
                rows: list[tuple[Any, ...]] = getattr(batch, table)
                if rows:
                    marks = ", ".join(["%s"] * len(columns))
                    cur.executemany(
                        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) ON CONFLICT DO NOTHING", rows
                    )


def forward_all(forwarder: Forwarder) -> tuple[int, float]:
    """Forward the whole journal; (records, seconds)."""
    start, total = time.perf_counter(), 0
    while shipped := forwarder.forward_once():
        total += shipped
    seconds = time.perf_counter() - start
    forwarder.stop()
    return total, seconds


def bench_strategies(pg: ThrowawayPostgres, journal: Path, batch: int, rounds: int) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {"copy": [], "executemany": []}
    for r in range(rounds):
        order = ["copy", "executemany"] if r % 2 == 0 else ["executemany", "copy"]
        for name in order:
            dsn = pg.create_database(f"bench_{name}")
            settings = CentralSettings(dsn=SecretStr(dsn), station_id="bench-1", line_id="L1", batch_size=batch)
            cls = Forwarder if name == "copy" else ExecutemanyForwarder
            n, seconds = forward_all(cls(settings, journal))
            rates[name].append(n / seconds)
            print(f"round {r + 1} {name:12s} {n} records in {seconds:6.2f} s: {n / seconds:9.0f} records/s")
    return rates


_GENERATE = """
INSERT INTO inspections (station_id, seq, line_id, request_id, image_index, received_at, camera_id, part_id,
    model_name, model_version, model_hash, backend, precision, verdict, width, height, image_sha256, image_bytes,
    tiled, tiles, timings_ms)
SELECT 'st-' || (g %% %(stations)s), g, 'line-' || (g %% %(stations)s %% 3), 'r' || g, 0,
    %(start)s::timestamptz + (g * %(step)s) * interval '1 second', 'cam-' || (g %% 4), 'P' || (g %% 97),
    'yolo11s', '1.4.0', 'abc', 'onnxruntime-cpu', 'fp32', CASE WHEN hashint(g) %% 100 < 8 THEN 'NG' ELSE 'OK' END,
    640, 640, md5(g::text), 50000, false, 1, '{"total": 10.0}'
FROM generate_series(1, %(rows)s) AS g"""
_GENERATE_DETECTIONS = """
INSERT INTO detections (station_id, seq, ordinal, received_at, verdict, class_id, class_name, score, x1, y1, x2, y2)
SELECT i.station_id, i.seq, o, i.received_at, i.verdict, c, (%(classes)s::text[])[c + 1], 0.8, 1, 1, 20, 20
FROM inspections i, generate_series(0, (i.seq %% 3)) AS o, LATERAL (SELECT ((i.seq + o * 7) %% 6)::int AS c) cls
WHERE i.verdict = 'NG'"""


def bench_query(pg: ThrowawayPostgres, rows: int, repeats: int = 7) -> float:
    """Fill a central database with ``rows`` records (10 stations, 30 days, 8 % NG with 1-3 detections) by
    generate_series, then time one station's NG rate for one class per day over the month; median ms."""
    dsn = pg.create_database("bench_query")
    start, step = "2026-01-01T00:00:00Z", 30 * 86400 / rows
    with psycopg.connect(dsn, autocommit=True) as conn:
        t0 = time.perf_counter()
        conn.execute("CREATE FUNCTION hashint(bigint) RETURNS int LANGUAGE sql IMMUTABLE AS "
                     "'SELECT abs(hashtextextended($1::text, 0) % 1000000)::int'")  # fmt: skip
        conn.execute(_GENERATE, {"stations": 10, "start": start, "step": step, "rows": rows})
        conn.execute(_GENERATE_DETECTIONS, {"classes": list(CLASSES)})
        conn.execute("VACUUM ANALYZE")
        (n_det,) = conn.execute("SELECT count(*) FROM detections").fetchone() or (0,)
        print(f"generated {rows} inspections, {n_det} detections in {time.perf_counter() - t0:.1f} s")
        since = 1767225600.0  # 2026-01-01
        filters = PlantFilters(station_id="st-3", class_name="scratches")
        times, result = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            result = ng_stats(conn, ("station_id", "class_name"), "day", since, since + 30 * 86400, filters)
            times.append((time.perf_counter() - t) * 1000)
    ms = statistics.median(times)
    rates = [round(r["ng_rate"] * 100, 2) for r in result]
    print(f"ng_stats station st-3, class scratches, per day over 30 days: {len(result)} rows, NG % {rates[:5]}...")
    print(f"  median {ms:.1f} ms over {repeats} runs (min {min(times):.1f}, max {max(times):.1f}); target < 200 ms")
    return ms


def bench_images(pg: ThrowawayPostgres, n: int, size: int = 50_000) -> float:
    """A journal of ``n`` NG records, each with an archived file of ``size`` random bytes, forwarded, then every
    image uploaded by :class:`ImageForwarder` to a :class:`DirectoryObjectStore` in a temporary folder; images/s."""
    rng = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir, root = Path(tmp) / "station", Path(tmp) / "objects"
        (data_dir / "images").mkdir(parents=True)
        records = []
        for rec in synthetic_records(n, seed=7):
            data = rng.randbytes(size)
            rec.verdict, rec.image_sha256, rec.image_bytes = "NG", hashlib.sha256(data).hexdigest(), size
            (data_dir / "images" / f"{rec.image_sha256}.jpg").write_bytes(data)  # write_journal's archive path
            records.append(rec)
        write_journal(data_dir, records, archive_ng=True)
        settings = CentralSettings(dsn=SecretStr(pg.create_database("bench_images")), station_id="bench-1")
        forward_all(Forwarder(settings, data_dir))
        uploader = ImageForwarder(settings, data_dir, DirectoryObjectStore(root), batch_size=100)
        start, total = time.perf_counter(), 0
        while settled := uploader.upload_once():
            total += settled
        seconds = time.perf_counter() - start
        uploader.stop()
    rate = total / seconds
    print(f"images: {total} of {size} bytes uploaded to a directory store in {seconds:.2f} s: {rate:.0f} images/s")
    return rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--query-rows", type=int, default=1_000_000, help="0 skips the query benchmark")
    parser.add_argument("--images", type=int, default=0, help="NG images to upload (0 skips the image benchmark)")
    args = parser.parse_args(argv)
    bindir = find_pg_bin()
    if bindir is None:
        print("PostgreSQL's initdb/pg_ctl not found (PATH, /usr/lib/postgresql/*/bin): install postgresql")
        return 2
    pg = ThrowawayPostgres(bindir)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            pg.start()
            t0 = time.perf_counter()
            write_journal(Path(tmp), synthetic_records(args.records))
            print(f"journal: {args.records} records in {time.perf_counter() - t0:.1f} s; PostgreSQL {pg.bindir}")
            rates = bench_strategies(pg, Path(tmp), args.batch, args.rounds)
            for name, values in rates.items():
                print(f"{name:12s} median {statistics.median(values):9.0f} records/s (target >= 5000)")
            if args.query_rows:
                bench_query(pg, args.query_rows)
            if args.images:
                bench_images(pg, args.images)
        finally:
            pg.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
