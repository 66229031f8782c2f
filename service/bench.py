"""`aoi bench service`: raw backend throughput per batch size vs the end-to-end HTTP service on the same bundle.

The service runs as a real uvicorn subprocess on 127.0.0.1 (loopback only, bounded duration). Phases: (1) raw backend,
each served batch size; (2) closed loop with N concurrent clients (saturation throughput, latency percentiles);
(3) open loop at half the saturation rate (latency when not saturated). Targets on CPU: service/raw >= 0.85 at
saturation, p99 at half saturation <= 2x raw batch-1 latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from service.settings import BACKEND_KINDS, PRECISIONS

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", choices=["service"], help="what to benchmark")
    parser.add_argument("--bundle", type=Path, default=Path("bundles/default"), help="model bundle directory")
    parser.add_argument("--backend", default="auto", choices=BACKEND_KINDS)
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="see `aoi serve --help`")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent HTTP clients at saturation")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per HTTP phase (raw: a third of it)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-delay-ms", type=float, default=2.0)
    parser.add_argument("--image", type=Path, default=None, help="image to send (default: a synthetic 1.5x-input JPEG)")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _raw(args: argparse.Namespace) -> dict[str, Any]:
    from service.backends import load_backend
    from service.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    choice = load_backend(args.backend, bundle, max_batch_size=args.max_batch_size, precision=args.precision)
    backend = choice.backend
    backend.warmup()
    spec = bundle.input
    sizes = [b for b in backend.batch_sizes if b in (1, 2, 4, 8, 16, 32, 64) or b == backend.batch_sizes[-1]]
    per_size = max(0.5, args.duration / 3 / len(sizes))
    rows = []
    rng = np.random.default_rng(0)
    for b in sizes:
        x = rng.random((b, 3, spec.height, spec.width), dtype=np.float32)
        lat: list[float] = []
        t_end = time.perf_counter() + per_size
        while time.perf_counter() < t_end or len(lat) < 3:
            t0 = time.perf_counter()
            backend.infer(x)
            lat.append(time.perf_counter() - t0)
        rows.append({"batch": b, "images_per_s": b * len(lat) / sum(lat), "latency_ms_p50": _pct(lat, 50) * 1e3})
    info = {"backend": backend.kind, "device": backend.device, "precision": backend.precision, "reason": choice.reason}
    backend.close()
    return {"info": info, "rows": rows}


def _image_bytes(args: argparse.Namespace) -> bytes:
    if args.image is not None:
        return bytes(Path(args.image).read_bytes())
    import cv2

    from service.bundle import load_bundle

    spec = load_bundle(args.bundle, verify_hashes=False).input
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (spec.height // 8, spec.width // 8, 3), dtype=np.uint8)
    img = cv2.resize(small, (spec.width * 3 // 2, spec.height * 3 // 2), interpolation=cv2.INTER_LINEAR)
    ok, buf = cv2.imencode(".jpg", img)
    if not ok:
        raise OSError("OpenCV could not encode the synthetic benchmark image")
    return bytes(buf.tobytes())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(args: argparse.Namespace, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "AOI_MAX_BATCH_SIZE": str(args.max_batch_size),
        "AOI_MAX_DELAY_MS": str(args.max_delay_ms),
        "AOI_QUEUE_SIZE": str(max(64, 4 * args.concurrency)),
        "AOI_DEADLINE_MS": "30000",
    }
    cmd = [sys.executable, "-m", "service", "--bundle", str(args.bundle), "--backend", args.backend]
    cmd += ["--precision", args.precision]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def _wait_ready(client: Any, proc: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"service exited with code {proc.returncode}: {err[-2000:]}")
        try:
            if (await client.get("/readyz")).status_code == 200:
                return
        except Exception:  # connection refused until uvicorn listens
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"service not ready after {timeout_s:.0f} s")


async def _post(client: Any, data: bytes, lat: list[float], errors: list[int]) -> None:
    t0 = time.perf_counter()
    r = await client.post("/v1/inspect", content=data, headers={"content-type": "image/jpeg"})
    if r.status_code == 200:
        lat.append(time.perf_counter() - t0)
    else:
        errors.append(r.status_code)


async def _closed_loop(client: Any, data: bytes, n: int, duration: float) -> dict[str, Any]:
    lat: list[float] = []
    errors: list[int] = []
    t_end = time.perf_counter() + duration

    async def worker() -> None:
        while time.perf_counter() < t_end:
            await _post(client, data, lat, errors)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(n)))
    elapsed = time.perf_counter() - t0
    return _summary(lat, errors, elapsed, concurrency=n)


async def _open_loop(client: Any, data: bytes, rate: float, duration: float) -> dict[str, Any]:
    lat: list[float] = []
    errors: list[int] = []
    tasks = []
    t0 = time.perf_counter()
    k = 0
    while (now := time.perf_counter()) < t0 + duration:
        due = t0 + k / rate
        if due > now:
            await asyncio.sleep(due - now)
        tasks.append(asyncio.ensure_future(_post(client, data, lat, errors)))
        k += 1
    await asyncio.gather(*tasks)
    return _summary(lat, errors, time.perf_counter() - t0, offered_rate=rate)


def _summary(lat: list[float], errors: list[int], elapsed: float, **extra: Any) -> dict[str, Any]:
    return {
        **extra,
        "requests_ok": len(lat),
        "errors": {str(c): errors.count(c) for c in sorted(set(errors))},
        "images_per_s": len(lat) / elapsed,
        "latency_ms": {f"p{q}": _pct(lat, q) * 1e3 for q in (50, 95, 99)},
    }


async def _http(args: argparse.Namespace, data: bytes) -> dict[str, Any]:
    import httpx

    port = _free_port()
    proc = _start_server(args, port)
    limits = httpx.Limits(max_connections=args.concurrency * 2 + 8, max_keepalive_connections=args.concurrency * 2 + 8)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60.0, limits=limits) as client:
            await _wait_ready(client, proc)
            await _closed_loop(client, data, args.concurrency, min(2.0, args.duration / 5))  # connections, caches
            sat = await _closed_loop(client, data, args.concurrency, args.duration)
            half = await _open_loop(client, data, max(0.5, sat["images_per_s"] / 2), args.duration)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"saturation": sat, "half_saturation": half}


def _table(result: dict[str, Any]) -> str:
    raw, http = result["raw"], result["http"]
    best = max(r["images_per_s"] for r in raw["rows"])
    b1 = next(r["latency_ms_p50"] for r in raw["rows"] if r["batch"] == raw["rows"][0]["batch"])
    lines = [f"backend {raw['info']['backend']} on {raw['info']['device']} ({raw['info']['precision']})", ""]
    lines.append(f"{'raw batch':>10} {'images/s':>10} {'ms/batch p50':>13}")
    lines += [f"{r['batch']:>10} {r['images_per_s']:>10.1f} {r['latency_ms_p50']:>13.2f}" for r in raw["rows"]]
    lines.append("")
    lines.append(f"{'http phase':>22} {'images/s':>10} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>8}")
    for name, key in (("saturation", "saturation"), ("half saturation", "half_saturation")):
        h = http[key]
        lat = h["latency_ms"]
        errs = sum(h["errors"].values())
        lines.append(
            f"{name:>22} {h['images_per_s']:>10.1f} {lat['p50']:>8.2f} {lat['p95']:>8.2f} {lat['p99']:>8.2f} {errs:>8}"
        )
    t = result["targets"]
    lines += [
        "",
        f"service/raw throughput ratio at saturation: {t['ratio']:.3f} (target >= 0.85; raw best {best:.1f} images/s)",
        f"p99 at half saturation / raw batch-1 latency: {t['p99_over_raw_b1']:.2f} (target <= 2; raw b1 {b1:.2f} ms)",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from service.bundle import BundleError, load_bundle
    from service.errors import BackendUnavailable

    if args.concurrency < 1 or args.duration <= 0:
        sys.stderr.write("aoi bench: error: --concurrency must be >= 1 and --duration > 0\n")
        return 2
    try:
        load_bundle(args.bundle)
        data = _image_bytes(args)
        raw = _raw(args)
    except BundleError as exc:
        sys.stderr.write(f"aoi bench: error: {exc.path}: {exc.problem}\n")
        return 2
    except (BackendUnavailable, OSError) as exc:
        sys.stderr.write(f"aoi bench: error: {exc}\n")
        return 1
    try:
        http = asyncio.run(_http(args, data))
    except RuntimeError as exc:
        sys.stderr.write(f"aoi bench: error: {exc}\n")
        return 1
    best = max(r["images_per_s"] for r in raw["rows"])
    b1 = raw["rows"][0]["latency_ms_p50"]
    result = {
        "bundle": str(args.bundle),
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "max_batch_size": args.max_batch_size,
        "max_delay_ms": args.max_delay_ms,
        "raw": raw,
        "http": http,
        "targets": {
            "ratio": http["saturation"]["images_per_s"] / best,
            "p99_over_raw_b1": http["half_saturation"]["latency_ms"]["p99"] / b1,
        },
    }
    sys.stdout.write(_table(result) + "\n")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        sys.stdout.write(f"wrote {args.json}\n")
    return 0
