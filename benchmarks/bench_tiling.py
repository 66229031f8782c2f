"""Speed of tiled inspection on line-camera frames, on this machine: decode against plain ``cv2.imdecode``, then
end-to-end megapixels/s of the HTTP service against the raw backend at the same tile batch size.

    python benchmarks/bench_tiling.py --bundle bundles/default [--data /path/to/NEU-DET] [--width 2448 --height 2048]

1. Decode (one core: ``cv2.setNumThreads(1)``): the same JPEG bytes through ``cv2.imdecode(IMREAD_COLOR)`` (the
   reference), ``decode_frame`` as tiling uses it (full size, mono stays mono), ``decode_frame`` reduced for a whole-
   frame letterbox (tiling off), and ``decode_image`` (RGB, what the service did before). Interleaved, medians.
2. Throughput: the service as a real uvicorn subprocess on 127.0.0.1 answers ``--clients`` closed-loop clients POSTing
   the frame (keep-alive); each HTTP slice is preceded by a raw slice (the bundle's backend in this process, every
   instance busy with full batches of ``--max-batch-size`` tiles) while the service idles, because this VM's speed
   drifts 10-20 % within a minute. Raw megapixels/s = raw tiles/s x (frame megapixels / tiles per frame).

The frame is built from NEU-DET val images at native scale when ``--data`` is given (mono, like a steel line camera),
else from seeded noise with a few bright defects. Loopback only; every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from benchmarks.loadgen import HttpLoadClient
from benchmarks.raw_backend import RawBackend
from benchmarks.server import free_port, start_service, wait_ready
from service.core.bundle import load_bundle
from service.core.frames import TilingSettings, plan_frame, resolve_policy
from service.core.preprocess import decode_frame, decode_image
from service.settings import Settings


def make_frame(width: int, height: int, data: Path | None, quality: int, color: bool = False) -> bytes:
    if data is not None:
        from train.dataset import load_split

        records = load_split(data, "val").records
        canvas = np.zeros((height, width), np.uint8)
        k = 0
        for y in range(0, height, 200):
            for x in range(0, width, 200):
                path = records[k % len(records)].path
                img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
                assert img is not None, f"cannot read {path}"
                k += 1
                h, w = min(200, height - y), min(200, width - x)
                canvas[y : y + h, x : x + w] = img[:h, :w]
    else:
        rng = np.random.default_rng(0)
        noise = rng.integers(60, 200, (height, width), dtype=np.uint8)
        canvas = np.asarray(cv2.GaussianBlur(noise, (5, 5), 0), dtype=np.uint8)
        for _ in range(40):
            x, y = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
            cv2.rectangle(canvas, (x, y), (x + int(rng.integers(5, 40)), y + int(rng.integers(5, 40))), 255, -1)
    if color:  # a colour camera: the same content, tinted, as a 3-channel JPEG
        tinted = [canvas, (canvas * 0.8).astype(np.uint8), (canvas * 0.6).astype(np.uint8)]
        canvas = np.asarray(cv2.merge(tinted), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def bench_decode(data: bytes, out_hw: tuple[int, int], reps: int) -> dict[str, float]:
    cv2.setNumThreads(1)
    buf = np.frombuffer(data, np.uint8)
    ways: dict[str, Callable[[], object]] = {
        "cv2.imdecode IMREAD_COLOR (reference)": lambda: cv2.imdecode(buf, cv2.IMREAD_COLOR),
        "decode_frame (tiling: full size, as coded)": lambda: decode_frame(data, max_pixels=10**9),
        "decode_frame reduced (tiling off)": lambda: decode_frame(data, max_pixels=10**9, reduce_to=out_hw),
        "decode_image (RGB, before)": lambda: decode_image(data, max_pixels=10**9),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(reps):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    cv2.setNumThreads(-1)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


async def http_slice(
    client: HttpLoadClient, request: bytes, clients: int, seconds: float
) -> tuple[int, float, list[dict[str, Any]]]:
    """Closed loop: frames answered 200 that started inside the window, over the window's real length."""
    t0 = time.perf_counter()
    t_end = t0 + seconds
    bodies: list[dict[str, Any]] = []
    errors: list[int] = []

    async def worker() -> None:
        while time.perf_counter() < t_end:
            status, body = await client.send(request)
            if status == 200:
                bodies.append(json.loads(body))
            else:
                errors.append(status)

    await asyncio.gather(*(worker() for _ in range(clients)))
    if errors:
        raise RuntimeError(f"HTTP errors during the slice: {errors[:5]}")
    return len(bodies), time.perf_counter() - t0, bodies


async def bench_http(args: argparse.Namespace, data: bytes, tiles: int, mp: float) -> dict[str, Any]:
    bundle = load_bundle(args.bundle)
    settings = Settings.model_construct(
        bundle=args.bundle, backend="onnxruntime-cpu", max_batch_size=args.max_batch_size
    )
    raw = RawBackend(settings, bundle)  # the service's CPU defaults: instances and threads as it resolves them
    port = free_port()
    with tempfile.TemporaryFile() as log:
        service = {"MAX_BATCH_SIZE": str(args.max_batch_size), "DEADLINE_MS": "120000", "QUEUE_SIZE": "4096"}
        proc = start_service(args.bundle, port, log, service, ["--backend", "onnxruntime-cpu"])
        client = HttpLoadClient("127.0.0.1", port, max_connections=args.clients + 2, timeout_s=300)
        try:
            await wait_ready(client, proc, log)
            request = client.build_request("POST", "/v1/inspect", f"127.0.0.1:{port}", data, "image/jpeg")
            await http_slice(client, request, 1, 0.1)  # one warm frame
            rows, bodies_all = [], []
            for r in range(args.rounds):
                raw_rate = raw.calls(args.max_batch_size, args.seconds, raw.instances).images_per_s
                n, span, bodies = await http_slice(client, request, args.clients, args.seconds)
                bodies_all += bodies
                raw_mps = raw_rate * mp / tiles
                http_mps = n * mp / span
                rows.append({"round": r + 1, "raw_mp_s": raw_mps, "http_mp_s": http_mps, "ratio": http_mps / raw_mps,
                             "frames": n})  # fmt: skip
                print(f"round {r + 1}: raw {raw_mps:.2f} MP/s ({raw_rate:.0f} tiles/s), HTTP {http_mps:.2f} MP/s "
                      f"({n} frames in {span:.1f} s), ratio {http_mps / raw_mps:.3f}", file=sys.stderr)  # fmt: skip
        finally:
            await client.close()
            proc.terminate()
            proc.wait(30)
            raw.close()
    stages = {k: statistics.median(b["timings_ms"][k] for b in bodies_all) for k in bodies_all[0]["timings_ms"]}
    return {"instances": raw.instances, "rounds": rows, "stage_ms_median": stages,
            "ratio_median": statistics.median(r["ratio"] for r in rows)}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=Path("bundles/default"))
    p.add_argument("--data", type=Path, default=None, help="NEU-DET folder: build the frame from its val images")
    p.add_argument("--width", type=int, default=2448)
    p.add_argument("--height", type=int, default=2048)
    p.add_argument("--quality", type=int, default=95)
    p.add_argument("--color", action="store_true", help="a colour (3-channel) JPEG instead of mono")
    p.add_argument("--decode-reps", type=int, default=30)
    p.add_argument("--max-batch-size", type=int, default=8, help="tile batch size, raw and served (default 8)")
    p.add_argument("--clients", type=int, default=2, help="concurrent HTTP clients (frames in flight)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=12.0, help="length of each raw and HTTP slice")
    p.add_argument("--skip-http", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    data = make_frame(args.width, args.height, args.data, args.quality, args.color)
    bundle = load_bundle(args.bundle)
    plan = plan_frame(args.width, args.height, resolve_policy(bundle, TilingSettings()))
    mp = args.width * args.height / 1e6
    print(f"frame {args.width}x{args.height} ({mp:.2f} MP, JPEG {len(data) / 1e6:.2f} MB): {plan.inputs} tiles")
    dec = bench_decode(data, (bundle.input.height, bundle.input.width), args.decode_reps)
    ref = next(iter(dec.values()))
    print(f"| decode (one core, median of {args.decode_reps}) | ms | vs cv2.imdecode |\n|---|---:|---:|")
    for name, ms in dec.items():
        print(f"| {name} | {ms:.1f} | {ms / ref:.2f}x |")
    result: dict[str, Any] = {"frame": [args.width, args.height], "tiles": plan.inputs, "decode_ms": dec}
    if not args.skip_http:
        http = asyncio.run(bench_http(args, data, plan.inputs, mp))
        result["http"] = http
        print("\n| round | raw MP/s | HTTP MP/s | HTTP / raw | frames |\n|---:|---:|---:|---:|---:|")
        for r in http["rounds"]:
            print(f"| {r['round']} | {r['raw_mp_s']:.2f} | {r['http_mp_s']:.2f} | {r['ratio']:.3f} | {r['frames']} |")
        s = http["stage_ms_median"]
        print("\nper 5 MP frame (median ms): " + ", ".join(f"{k} {v:.0f}" for k, v in s.items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
