"""What forwarding every record to the plant's central PostgreSQL costs a station, and how fast it catches up after
the central database was down.

    python -m benchmarks.bench_plant --image frame.jpg [--bundle bundles/default --clients 16 --seconds 10
                                     --rounds 3 --outage 30 --rate 100]

A throwaway PostgreSQL 15 (fsync on; initdb + pg_ctl in a temporary folder, loopback only) and two ``aoi serve``
subprocesses with durable records, one forwarding to it (``AOI_CENTRAL__DSN``) and one not, idle but for the one
measured. Rounds alternate the two at saturation (``--clients`` closed-loop keep-alive clients, every request a
different image) and print the goodput of each and the ratio forwarding / not (target >= 0.95, the median of the
per-round ratios: adjacent phases, so the machine's drift cancels).

Then the outage: the forwarding service gets a paced open-loop load of ``--rate`` images/s; PostgreSQL is stopped
(immediate) for ``--outage`` seconds, and started again while the load goes on. Printed: answers that were not 200
during the outage (target 0), the backlog at its end, and the seconds from the restart until the backlog is 0
(target < 30 s for 30 s at 200 images/s); then the central and the journal counts (equal: nothing lost, nothing
twice).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.bench_forward import ThrowawayPostgres, find_pg_bin
from benchmarks.bench_records import closed_loop_phase, metric_sample, variants
from benchmarks.loadgen import HttpLoadClient
from benchmarks.server import free_port, log_tail, start_service, wait_ready

STATION = "bench-station"


async def _paced(client: HttpLoadClient, bodies: list[bytes], ctype: str, rate: float, stop: asyncio.Event,
                 start_at: int, counts: dict[str, int]) -> None:  # fmt: skip
    """Send ``rate`` requests per second (open loop, each on its own task) until ``stop``; count answers by status."""
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int) -> None:
        status, _ = await client.post(f"/v1/inspect?camera_id=bench&part_id=p{i}", bodies[i % len(bodies)], ctype)
        key = "ok" if status == 200 else f"status_{status}"
        counts[key] = counts.get(key, 0) + 1

    t0, i = time.perf_counter(), 0
    while not stop.is_set():
        due = t0 + i / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        task = asyncio.create_task(one(start_at + i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
    await asyncio.gather(*tasks, return_exceptions=True)


async def _backlog(client: HttpLoadClient) -> int:
    status, body = await client.get("/v1/station")
    if status != 200:
        raise RuntimeError(f"/v1/station answered {status}: {body[:200]!r}")
    backlog = json.loads(body)["central"]["forwarder"]["backlog"]
    return int(backlog) if backlog is not None else 2**31  # None: not read from the journal yet


def _counts(dsn: str, data_dir: Path) -> tuple[int, int, int]:
    """(central records, central distinct seqs, journal records) of the station."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT seq) FROM inspections WHERE station_id = %s", [STATION]
        ).fetchone()
    with sqlite3.connect(data_dir / "records.sqlite3") as journal:
        stored = journal.execute("SELECT count(*) FROM inspections").fetchone()[0]
    assert row is not None
    return int(row[0]), int(row[1]), int(stored)


async def _saturation(args: argparse.Namespace, clients: dict[str, HttpLoadClient], bodies: list[bytes],
                      ctype: str) -> dict[str, Any]:  # fmt: skip
    rounds: dict[str, list[float]] = {"off": [], "on": []}
    sent = dict.fromkeys(rounds, 0)
    for r in range(args.rounds):
        for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
            warm = await closed_loop_phase(clients[mode], bodies, ctype, args.clients, args.warmup, sent[mode])
            sent[mode] += warm["sent"]
            result = await closed_loop_phase(clients[mode], bodies, ctype, args.clients, args.seconds, sent[mode])
            sent[mode] += result["sent"]
            rounds[mode].append(result["goodput"])
            print(f"round {r + 1} forwarding {mode:3s} {result['goodput']:7.1f} images/s  p50 {result['p50_ms']:6.1f}"
                  f" ms  p99 {result['p99_ms']:6.1f} ms  other {result['other']}", flush=True)  # fmt: skip
    ratios = [on / off for on, off in zip(rounds["on"], rounds["off"], strict=True)]
    return {"goodput": rounds, "ratios": [round(x, 3) for x in ratios], "ratio_median": statistics.median(ratios),
            "sent_on": sent["on"]}  # fmt: skip


async def _outage(args: argparse.Namespace, pg: ThrowawayPostgres, client: HttpLoadClient, bodies: list[bytes],
                  ctype: str, start_at: int) -> dict[str, Any]:  # fmt: skip
    deadline = time.monotonic() + 60
    while await _backlog(client) > 0:  # start from a caught-up station
        if time.monotonic() > deadline:
            raise RuntimeError("the forwarder did not catch up before the outage")
        await asyncio.sleep(0.2)
    stop, counts = asyncio.Event(), dict[str, int]()
    load = asyncio.create_task(_paced(client, bodies, ctype, args.rate, stop, start_at, counts))
    await asyncio.sleep(2.0)
    await asyncio.to_thread(pg.stop, "immediate")
    print(f"central PostgreSQL stopped for {args.outage:.0f} s under {args.rate:.0f} images/s", flush=True)
    await asyncio.sleep(args.outage)
    during = dict(counts)
    backlog_at_end = await _backlog(client)
    await asyncio.to_thread(pg.start)
    up = time.monotonic()
    while (backlog := await _backlog(client)) > 0:
        if time.monotonic() - up > 300:
            break
        await asyncio.sleep(0.2)
    catch_up_s = time.monotonic() - up
    stop.set()
    await load
    print(f"backlog at the end of the outage: {backlog_at_end} records; caught up in {catch_up_s:.1f} s after the "
          f"restart (backlog now {backlog}); answers: {counts}", flush=True)  # fmt: skip
    return {
        "rate": args.rate,
        "outage_s": args.outage,
        "answers_during_outage": during,
        "answers": counts,
        "backlog_at_end_of_outage": backlog_at_end,
        "catch_up_s": round(catch_up_s, 2),
        "backlog_after": backlog,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    bindir = find_pg_bin()
    if bindir is None:
        raise SystemExit("PostgreSQL's initdb/pg_ctl not found (apt-get install postgresql)")
    ctype = "image/png" if args.image.suffix.lower() == ".png" else "image/jpeg"
    bodies = variants(args.image, args.variants)
    tmp = Path(tempfile.mkdtemp(prefix="aoi-bench-plant-"))
    pg = ThrowawayPostgres(bindir, fsync=args.pg_fsync == "on")
    pg.start()
    dsn = pg.create_database("plant")
    modes = {
        "off": {"DATA_DIR": str(tmp / "data-off")},
        "on": {"DATA_DIR": str(tmp / "data-on"), "CENTRAL__DSN": dsn, "STATION_ID": STATION},
    }
    procs, logs, clients = {}, {}, {}
    try:
        for mode, settings in modes.items():
            port = free_port()
            logs[mode] = (tmp / f"{mode}.log").open("w+b")
            procs[mode] = start_service(args.bundle, port, logs[mode], settings)
            clients[mode] = HttpLoadClient("127.0.0.1", port, max_connections=max(args.clients, 256) + 4)
        for mode in modes:
            await wait_ready(clients[mode], procs[mode], logs[mode])
        report: dict[str, Any] = {"saturation": await _saturation(args, clients, bodies, ctype)}
        if args.outage > 0:
            report["outage"] = await _outage(args, pg, clients["on"], bodies, ctype, 10**7)
        end = time.monotonic() + 60
        while await _backlog(clients["on"]) > 0 and time.monotonic() < end:  # forwarded within about a second
            await asyncio.sleep(0.2)
        metrics = (await clients["on"].get("/metrics"))[1].decode()
        report["forwarded"] = metric_sample(metrics, "aoi_forward_records_total")
        for mode in modes:
            if procs[mode].poll() is not None:
                raise RuntimeError(f"{mode} service died: {log_tail(logs[mode])}")
    finally:
        for c in clients.values():
            await c.close()
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait(30)
    central, distinct, journal = _counts(dsn, tmp / "data-on")
    pg.destroy()
    report["counts"] = {"central": central, "central_distinct_seq": distinct, "journal": journal}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, required=True, help="a frame as the line sends it (JPEG or PNG)")
    parser.add_argument("--bundle", type=Path, default=Path("bundles/default"))
    parser.add_argument("--clients", type=int, default=16, help="closed-loop clients (about saturation)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per mode and round")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", type=int, default=4000, help="distinct images, sent in turn")
    parser.add_argument("--outage", type=float, default=30.0, help="seconds the central database is down (0: skip)")
    parser.add_argument("--rate", type=float, default=100.0, help="images/s sent during and after the outage")
    parser.add_argument(
        "--pg-fsync", choices=("on", "off"), default="on",
        help="the throwaway PostgreSQL's fsync: off takes its disk flushes out of the station's way (on a plant the "
        "central database has disks of its own; here it shares the station's)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="write the report here too")
    args = parser.parse_args(argv)
    if not args.image.is_file():
        parser.error(f"--image {args.image}: no such file")
    report = asyncio.run(run(args))
    sat, counts = report["saturation"], report["counts"]
    print(f"\nforwarding on / off at saturation: {sat['ratio_median']:.3f} (target >= 0.95; per round "
          f"{sat['ratios']})")  # fmt: skip
    if "outage" in report:
        o = report["outage"]
        print(f"outage of {o['outage_s']:.0f} s at {o['rate']:.0f} images/s: {o['backlog_at_end_of_outage']} records "
              f"behind, caught up in {o['catch_up_s']:.1f} s (target < 30 s)")  # fmt: skip
        print(f"answers during the outage: {o['answers_during_outage']}")
    same = counts["central"] == counts["journal"] == counts["central_distinct_seq"]
    print(f"central {counts['central']} records ({counts['central_distinct_seq']} distinct seq), journal "
          f"{counts['journal']}: {'equal' if same else 'DIFFERENT'}")  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
