"""Overload: does the service keep its rate when far more clients than it can serve keep sending?

    python benchmarks/bench_overload.py --bundle bundles/default --image frame.jpg [--clients 16 --overload 4]

``aoi serve`` (its default settings) runs as a uvicorn subprocess on 127.0.0.1. Closed-loop keep-alive clients POST
the image: first ``--clients`` of them (about saturation), then ``--overload`` times as many, each phase
``--seconds`` long, loopback only and bounded in time. Printed per phase: goodput (200 answers per second), refused
answers per second and their p99 latency, p99 latency of the admitted (200) answers, and the service's RSS before,
at the end of the phase and 5 s after the load stopped. Targets (issue 12): goodput under overload >= 0.9x the
goodput at saturation, refusals answered within 50 ms, admitted p99 within the deadline, RSS growth under 10 %.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.loadgen import HttpLoadClient
from benchmarks.server import free_port, start_service, wait_ready


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3 if values else float("nan")


async def _phase(client: HttpLoadClient, request: bytes, clients: int, seconds: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    t_end = t0 + seconds
    ok: list[float] = []
    refused: list[float] = []
    other: dict[int, int] = {}

    async def worker() -> None:
        while time.perf_counter() < t_end:
            start = time.perf_counter()
            try:
                status, _ = await client.send(request)
            except OSError:
                status = -1
            took = time.perf_counter() - start
            if status == 200:
                ok.append(took)
            elif status == 503:
                refused.append(took)
                await asyncio.sleep(0.01)  # a polite client backs off a little; a hostile one would not
            else:
                other[status] = other.get(status, 0) + 1

    await asyncio.gather(*(worker() for _ in range(clients)))
    span = time.perf_counter() - t0
    return {
        "clients": clients,
        "goodput_per_s": len(ok) / span,
        "refused_per_s": len(refused) / span,
        "refused_p99_ms": _pct(refused, 99),
        "admitted_p50_ms": _pct(ok, 50),
        "admitted_p99_ms": _pct(ok, 99),
        "other_statuses": other,
    }


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    data = Path(args.image).read_bytes()
    port = free_port()
    rows = []
    with tempfile.TemporaryFile() as log:
        proc = start_service(args.bundle, port, log)  # its default settings
        client = HttpLoadClient("127.0.0.1", port, max_connections=args.clients * args.overload + 8, timeout_s=60)
        try:
            await wait_ready(client, proc, log)
            request = client.build_request("POST", "/v1/inspect", f"127.0.0.1:{port}", data, "image/jpeg")
            await _phase(client, request, args.clients, 2.0)  # warm
            for name, n in (("saturation", args.clients), ("overload", args.clients * args.overload)):
                before = _rss_mb(proc.pid)
                row = await _phase(client, request, n, args.seconds)
                row.update(phase=name, rss_before_mb=before, rss_end_mb=_rss_mb(proc.pid))
                await asyncio.sleep(5.0)
                row["rss_after_5s_mb"] = _rss_mb(proc.pid)
                rows.append(row)
                print(f"{name}: {json.dumps(row)}", file=sys.stderr)
        finally:
            await client.close()
            proc.terminate()
            proc.wait(30)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=Path("bundles/default"))
    p.add_argument("--image", type=Path, required=True, help="the frame every client sends (e.g. a NEU-DET JPEG)")
    p.add_argument("--clients", type=int, default=16, help="clients at about saturation (default 16)")
    p.add_argument("--overload", type=int, default=4, help="overload = this many times the clients (default 4)")
    p.add_argument("--seconds", type=float, default=30.0, help="length of each phase (default 30)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    rows = asyncio.run(run(args))
    head = "| phase | clients | goodput /s | refused /s | refused p99 ms | admitted p50 / p99 ms "
    print(head + "| RSS MB before / end / +5 s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['phase']} | {r['clients']} | {r['goodput_per_s']:.1f} | {r['refused_per_s']:.1f} | "
              f"{r['refused_p99_ms']:.1f} | {r['admitted_p50_ms']:.0f} / {r['admitted_p99_ms']:.0f} | "
              f"{r['rss_before_mb']:.0f} / {r['rss_end_mb']:.0f} / {r['rss_after_5s_mb']:.0f} |")  # fmt: skip
    sat, over = rows[0]["goodput_per_s"], rows[1]["goodput_per_s"]
    print(f"\ngoodput under overload / at saturation: {over / sat:.2f} (target >= 0.9)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
