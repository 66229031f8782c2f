"""What recording every inspection costs at saturation: the service without records, with fast records and with
durable records (the default), interleaved in one run.

    python benchmarks/bench_records.py --image frame.jpg [--bundle bundles/default --clients 16 --seconds 10]

Three ``aoi serve`` subprocesses (127.0.0.1, default settings but ``records.enabled`` / ``records.durability``, each
with its own data folder under a temporary directory) run side by side, idle but for the one measured. Rounds: each
mode in turn (the order rotates per round) gets ``--clients`` closed-loop keep-alive clients for ``--seconds`` after
a warm-up. Every request sends a different image (the frame with a few pixels changed, re-encoded: no two archived
files are the same, as on a line), so durable mode really writes and fsyncs one file per NG image.

Printed per mode: goodput (200 answers per second) per round and its median, p50/p99 latency, the NG share, and from
the service's /metrics: records written, lost, group commit p99 and mean group size; then the ratios of issue 13
(fast >= 0.95x, durable >= 0.85x of no records), each the median of the per-round ratios (adjacent phases, so the
machine's drift cancels).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from benchmarks.loadgen import HttpLoadClient
from benchmarks.server import free_port, log_tail, start_service, wait_ready

MODES: dict[str, dict[str, str]] = {
    "off": {"RECORDS__ENABLED": "false"},
    "fast": {"RECORDS__DURABILITY": "fast"},
    "durable": {"RECORDS__DURABILITY": "durable"},
}


def variants(image: Path, n: int) -> list[bytes]:
    """``n`` different JPEG/PNG encodings of ``image``: pixel ``i`` of the top row nudged, then re-encoded."""
    img = cv2.imread(str(image), cv2.IMREAD_COLOR)
    if img is None:
        raise SystemExit(f"{image}: OpenCV cannot read it as an image")
    ext = ".png" if image.suffix.lower() == ".png" else ".jpg"
    out = []
    for i in range(n):
        v = img.copy()
        y, x = divmod(i, v.shape[1])
        v[y % v.shape[0], x] ^= np.uint8(1 + i % 7)
        ok, buf = cv2.imencode(ext, v, [cv2.IMWRITE_JPEG_QUALITY, 95] if ext == ".jpg" else [])
        if not ok:
            raise SystemExit(f"{image}: cannot re-encode it")
        out.append(buf.tobytes())
    return out


def metric_sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _quantile_from_histogram(metrics: str, name: str, q: float) -> float:
    """The ``q`` quantile (upper bucket bound) of a Prometheus histogram in text format."""
    buckets = []
    for line in metrics.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    if not buckets or buckets[-1][1] == 0:
        return float("nan")
    total = buckets[-1][1]
    return next(le for le, count in buckets if count >= q * total)


async def closed_loop_phase(client: HttpLoadClient, bodies: list[bytes], ctype: str, clients: int, seconds: float,
                 start_at: int) -> dict[str, Any]:  # fmt: skip
    latencies: list[float] = []
    verdicts = {"OK": 0, "NG": 0}
    other: dict[int, int] = {}
    counter = iter(range(start_at, start_at + 10**9))
    t_end = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < t_end:
            i = next(counter)
            t0 = time.perf_counter()
            status, body = await client.post(
                f"/v1/inspect?camera_id=bench&part_id=p{i}", bodies[i % len(bodies)], ctype
            )
            if status == 200:
                latencies.append(time.perf_counter() - t0)
                verdicts[json.loads(body)["verdict"]] += 1
            else:
                other[status] = other.get(status, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1e3
    return {
        "goodput": len(latencies) / wall,
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
        "ng_share": verdicts["NG"] / max(1, len(latencies)),
        "other": other,
        "sent": next(counter) - start_at,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ctype = "image/png" if args.image.suffix.lower() == ".png" else "image/jpeg"
    bodies = variants(args.image, args.variants)
    tmp = Path(tempfile.mkdtemp(prefix="aoi-bench-records-"))
    procs, logs, clients = {}, {}, {}
    try:
        for mode, settings in MODES.items():
            port = free_port()
            logs[mode] = (tmp / f"{mode}.log").open("w+b")
            env = {**settings, "DATA_DIR": str(tmp / f"data-{mode}")}
            procs[mode] = start_service(args.bundle, port, logs[mode], env)
            clients[mode] = HttpLoadClient("127.0.0.1", port, max_connections=args.clients + 4)
        for mode in MODES:
            await wait_ready(clients[mode], procs[mode], logs[mode])
        rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
        order = list(MODES)
        sent = dict.fromkeys(MODES, 0)
        for r in range(args.rounds):
            for mode in order[r % len(order) :] + order[: r % len(order)]:
                warm = await closed_loop_phase(clients[mode], bodies, ctype, args.clients, args.warmup, sent[mode])
                sent[mode] += warm["sent"]
                result = await closed_loop_phase(clients[mode], bodies, ctype, args.clients, args.seconds, sent[mode])
                sent[mode] += result["sent"]
                rounds[mode].append(result)
                print(f"round {r + 1} {mode:8s} {result['goodput']:7.1f}/s  p50 {result['p50_ms']:6.1f} ms  "
                      f"p99 {result['p99_ms']:6.1f} ms  NG {result['ng_share']:.0%}  other {result['other']}",
                      flush=True)  # fmt: skip
        metrics = {m: (await clients[m].get("/metrics"))[1].decode() for m in MODES}
        for mode in MODES:
            if procs[mode].poll() is not None:
                raise RuntimeError(f"{mode} service died: {log_tail(logs[mode])}")
    finally:
        for c in clients.values():
            await c.close()
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait(30)
    report: dict[str, Any] = {"clients": args.clients, "seconds": args.seconds, "rounds": args.rounds, "modes": {}}
    for mode in MODES:
        m = metrics[mode]
        written = metric_sample(m, "aoi_records_written_total")
        groups = metric_sample(m, "aoi_records_group_size_count")
        report["modes"][mode] = {
            "goodput": [round(x["goodput"], 1) for x in rounds[mode]],
            "goodput_median": round(statistics.median(x["goodput"] for x in rounds[mode]), 1),
            "p50_ms": round(statistics.median(x["p50_ms"] for x in rounds[mode]), 1),
            "p99_ms": round(statistics.median(x["p99_ms"] for x in rounds[mode]), 1),
            "ng_share": round(statistics.mean(x["ng_share"] for x in rounds[mode]), 3),
            "records_written": written,
            "records_lost": metric_sample(m, "aoi_records_lost_total"),
            "archived": metric_sample(m, "aoi_archive_images_total"),
            "commit_p99_ms": round(_quantile_from_histogram(m, "aoi_records_commit_seconds", 0.99) * 1e3, 2),
            "mean_group": round(written / groups, 1) if groups else None,
        }
    for mode in ("fast", "durable"):
        ratios = [x["goodput"] / o["goodput"] for x, o in zip(rounds[mode], rounds["off"], strict=True)]
        report["modes"][mode]["ratio_vs_off"] = [round(r, 3) for r in ratios]
        report["modes"][mode]["ratio_median"] = round(statistics.median(ratios), 3)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, required=True, help="a frame as the line sends it (JPEG or PNG)")
    parser.add_argument("--bundle", type=Path, default=Path("bundles/default"))
    parser.add_argument("--clients", type=int, default=16, help="closed-loop clients (about saturation)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per mode and round")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", type=int, default=8000, help="distinct images, sent in turn by every mode")
    parser.add_argument("--json", type=Path, default=None, help="write the report here too")
    args = parser.parse_args(argv)
    if not args.image.is_file():
        parser.error(f"--image {args.image}: no such file")
    report = asyncio.run(run(args))
    print()
    print(f"{'mode':8s} {'goodput/s':>10s} {'p50 ms':>8s} {'p99 ms':>8s} {'NG':>5s} {'written':>8s} {'lost':>5s} "
          f"{'commit p99':>11s} {'group':>6s} {'vs off':>7s}")  # fmt: skip
    for mode, r in report["modes"].items():
        ratio = f"{r['ratio_median']:.3f}" if "ratio_median" in r else "1"
        print(f"{mode:8s} {r['goodput_median']:10.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['ng_share']:5.0%} "
              f"{r['records_written']:8.0f} {r['records_lost']:5.0f} {r['commit_p99_ms']:9.2f}ms "
              f"{r['mean_group'] or 0:6.1f} {ratio:>7s}")  # fmt: skip
    fast, durable = report["modes"]["fast"]["ratio_median"], report["modes"]["durable"]["ratio_median"]
    print(f"\ntargets: fast >= 0.95x: {fast:.3f} {'PASS' if fast >= 0.95 else 'FAIL'}; "
          f"durable >= 0.85x: {durable:.3f} {'PASS' if durable >= 0.85 else 'FAIL'}")  # fmt: skip
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
