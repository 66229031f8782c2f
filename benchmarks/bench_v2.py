"""The Open Inference Protocol v2 infer route (binary-data extension) against ``/v1/inspect`` on the same server.

    python benchmarks/bench_v2.py [--bundle bundles/default --backend onnxruntime-cpu --concurrency 16
                                   --duration 20 --single-duration 16 --rounds 4 --json out.json]

One ``aoi serve`` subprocess on 127.0.0.1 (started as ``aoi bench service`` starts it: :mod:`benchmarks.service_bench`,
records durable in a temporary folder); the same image (the bundle's native tile, or 1.5x its input: one model input)
is sent one per request as ``/v1/inspect``'s raw body and as ``POST /v2/models/{name}/infer`` with the image as a
BYTES ``[1]`` input in binary (``Inference-Header-Content-Length``, every output binary, as tritonclient sends it
when no outputs are named). The keep-alive load client is :mod:`benchmarks.loadgen`'s. Two phases, each in
``--rounds`` rounds, so that the machine's drift falls on both protocols alike:

1. saturation: ``--concurrency`` closed-loop clients, each round a slice of v1 and one of v2 (v1 first in even rounds,
   v2 first in odd ones); images/s and latency per protocol;
2. one client, alternating v1 and v2 request by request (closed loop): the latency of a request with nothing queued,
   where a protocol's own cost (parsing, framing) is not hidden in queueing, and where the machine's drift cannot
   fall on one protocol more than the other (slices of seconds did, on a shared 2-core machine).

Targets (issue 25): v2 images/s >= 0.95x v1 at saturation; v2 p50 within 1 ms of v1's (one client).
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

from benchmarks.loadgen import HttpLoadClient
from benchmarks.server import free_port, log_tail, wait_ready
from benchmarks.service_bench import (
    _closed_loop,
    _image_bytes,
    _Load,
    _max_delay,
    _note,
    _post,
    _service_setting,
    _start_server,
    _unwritable,
)
from service.settings import BACKEND_KINDS, PRECISIONS

PROTOCOLS = ("v1", "v2")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("bundles/default"), help="model bundle directory")
    parser.add_argument("--backend", default="auto", choices=BACKEND_KINDS)
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients at saturation")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of saturation load per protocol")
    parser.add_argument("--single-duration", type=float, default=16.0, help="seconds of the one-client phase")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved slices per phase")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-delay-ms", type=_max_delay, default="auto")
    parser.add_argument("--instances", type=int, default=0, help="batches in flight at once (0 = auto)")
    parser.add_argument("--records", choices=["durable", "fast", "off"], default="durable")
    parser.add_argument("--set", type=_service_setting, action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--image", type=Path, default=None, help="image to send (default: a synthetic JPEG)")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.rounds < 1 or args.duration <= 0 or args.single_duration <= 0:
        parser.error("--concurrency and --rounds must be >= 1, the durations > 0")
    if args.json is not None and (problem := _unwritable(args.json)):
        parser.error(f"{args.json}: {problem}")
    args.clients = args.concurrency  # the name service_bench's server settings read
    return args


def v2_request(client: HttpLoadClient, model: str, image: bytes) -> bytes:
    """``POST /v2/models/{model}/infer`` with ``image`` as a BYTES [1] input in the binary-data extension, every
    output asked for as binary: what ``tritonclient.http`` sends for ``infer(model, [input])``."""
    element = len(image).to_bytes(4, "little") + image
    header = json.dumps(
        {
            "inputs": [
                {"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(element)}}
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    headers = {"inference-header-content-length": str(len(header))}
    path = f"/v2/models/{model}/infer"
    return client.build_request("POST", path, client.host, header + element, "application/octet-stream", headers)


async def _check_answers(client: HttpLoadClient, requests: dict[str, bytes]) -> None:
    """One request per protocol before the load: both 200 (a benchmark of error answers measures nothing)."""
    for name, request in requests.items():
        status, body = await client.send(request)
        if status != 200:
            raise RuntimeError(f"{name} answered {status}: {body[:300]!r}")


async def _phase(
    client: HttpLoadClient, requests: dict[str, bytes], clients: int, seconds: float, rounds: int, label: str
) -> tuple[dict[str, _Load], list[dict[str, float]]]:
    loads = {p: _Load() for p in PROTOCOLS}
    per_round: list[dict[str, float]] = []
    for r in range(rounds):
        order = PROTOCOLS if r % 2 == 0 else PROTOCOLS[::-1]
        rates: dict[str, float] = {}
        for p in order:
            before = loads[p].ok_in_window
            await _closed_loop(client, requests[p], clients, seconds / rounds, loads[p])
            rates[p] = (loads[p].ok_in_window - before) / (seconds / rounds)
        per_round.append(rates)
        _note(f"{label} {r + 1}/{rounds}: v1 {rates['v1']:.1f} images/s, v2 {rates['v2']:.1f} images/s")
    return loads, per_round


async def _alternating(
    client: HttpLoadClient, requests: dict[str, bytes], seconds: float, rounds: int
) -> tuple[dict[str, _Load], list[dict[str, float]]]:
    """One client sending v1 and v2 in turn (the order flipped every pair) for ``seconds``, in ``rounds`` slices."""
    loads = {p: _Load() for p in PROTOCOLS}
    per_round: list[dict[str, float]] = []
    for r in range(rounds):
        before = {p: loads[p].ok_in_window for p in PROTOCOLS}
        t_end, k = time.perf_counter() + seconds / rounds, 0
        while time.perf_counter() < t_end:
            for p in PROTOCOLS if k % 2 == 0 else PROTOCOLS[::-1]:
                await _post(client, requests[p], loads[p], t_end)
            k += 1
        for p in PROTOCOLS:
            loads[p].window_s += seconds / rounds
        per_round.append({p: (loads[p].ok_in_window - before[p]) / (seconds / rounds) for p in PROTOCOLS})
        _note(f"one client {r + 1}/{rounds}: v1 {per_round[-1]['v1']:.1f} images/s, v2 {per_round[-1]['v2']:.1f}")
    return loads, per_round


async def _bench(args: argparse.Namespace, model: str, image: bytes) -> dict[str, Any]:
    with (
        tempfile.TemporaryFile(prefix="aoi-bench-v2-") as log,
        tempfile.TemporaryDirectory(prefix="aoi-bench-v2-data-") as data_dir,
    ):
        port = free_port()
        proc = _start_server(args, port, log, Path(data_dir))
        client = HttpLoadClient("127.0.0.1", port, max_connections=args.concurrency * 2 + 8)
        requests = {
            "v1": client.build_request("POST", "/v1/inspect", client.host, image, "image/jpeg"),
            "v2": v2_request(client, model, image),
        }
        try:
            await wait_ready(client, proc, log)
            status, body = await client.get("/v1/model")
            info = json.loads(body) if status == 200 else {}
            service = {k: info.get(k) for k in ("backend", "device", "precision", "instances", "max_delay_ms")}
            _note(f"service: {service}")
            await _check_answers(client, requests)
            for p in PROTOCOLS:  # warm-up, not counted
                await _closed_loop(client, requests[p], args.concurrency, 1.0, _Load())
            sat, sat_rounds = await _phase(client, requests, args.concurrency, args.duration, args.rounds, "saturation")
            one, one_rounds = await _alternating(client, requests, args.single_duration, args.rounds)
        except (RuntimeError, OSError) as exc:
            raise RuntimeError(f"{exc}; service log: {log_tail(log)}") from exc
        finally:
            await client.close()
            proc.terminate()
            proc.wait(timeout=15)
    return {
        "service": service,
        "saturation": {p: sat[p].summary(concurrency=args.concurrency) for p in PROTOCOLS},
        "saturation_rounds": sat_rounds,
        "one_client": {p: one[p].summary(concurrency=1) for p in PROTOCOLS},
        "one_client_rounds": one_rounds,
    }


def _table(result: dict[str, Any]) -> str:
    lines = [f"service: {result['service']}, image {result['image_bytes']} bytes", ""]
    lines += [f"{'phase':>12} {'protocol':>9} {'images/s':>10} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>7}"]
    for phase in ("saturation", "one_client"):
        for p in PROTOCOLS:
            h = result[phase][p]
            lat, name = h["latency_ms"], phase.replace("_", " ")
            lines.append(
                f"{name:>12} {p:>9} {h['images_per_s']:>10.1f} {lat['p50']:>8.2f} {lat['p95']:>8.2f} "
                f"{lat['p99']:>8.2f} {sum(h['errors'].values()):>7}"
            )
    t = result["targets"]
    lines += [
        "",
        f"v2/v1 images/s at saturation: {t['ratio_saturation']:.3f} (target >= 0.95; per round "
        f"{min(t['ratio_per_round']):.3f}..{max(t['ratio_per_round']):.3f})",
        f"v2 - v1 p50, one client: {t['p50_delta_one_client_ms']:+.2f} ms; at saturation: "
        f"{t['p50_delta_saturation_ms']:+.2f} ms (target within 1 ms)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from service.core.bundle import BundleError, load_bundle

    args = _arguments(argv)
    try:
        bundle = load_bundle(args.bundle)
        tile = (bundle.tiling.tile_width, bundle.tiling.tile_height) if bundle.tiling is not None else None
        image = _image_bytes(args, bundle.input, tile)
    except BundleError as exc:
        sys.stderr.write(f"bench_v2: error: {exc.path}: {exc.problem}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"bench_v2: error: {exc}\n")
        return 1
    t0 = time.monotonic()
    try:
        result = asyncio.run(_bench(args, bundle.name, image))
    except RuntimeError as exc:
        sys.stderr.write(f"bench_v2: error: {exc}\n")
        return 1
    sat, one = result["saturation"], result["one_client"]
    result["targets"] = {
        "ratio_saturation": sat["v2"]["images_per_s"] / max(sat["v1"]["images_per_s"], 1e-9),
        "ratio_per_round": [r["v2"] / max(r["v1"], 1e-9) for r in result["saturation_rounds"]],
        "p50_delta_one_client_ms": one["v2"]["latency_ms"]["p50"] - one["v1"]["latency_ms"]["p50"],
        "p50_delta_saturation_ms": sat["v2"]["latency_ms"]["p50"] - sat["v1"]["latency_ms"]["p50"],
    }
    result.update(bundle=str(args.bundle), image_bytes=len(image), wall_s=time.monotonic() - t0)
    sys.stdout.write(_table(result) + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        sys.stdout.write(f"wrote {args.json}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
