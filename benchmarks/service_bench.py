"""`aoi bench service`: raw backend throughput per batch size vs the end-to-end HTTP service on the same bundle.

The service runs as a real uvicorn subprocess on 127.0.0.1 (loopback only, bounded duration); the raw backend
(:mod:`benchmarks.raw_backend`) is loaded in this process with the same settings (instances, intra-op threads). Phases:

1. raw sweep over the served batch sizes: latency of one call alone, and throughput with every instance busy;
2. saturation: N concurrent keep-alive clients (closed loop), in ``--rounds`` slices, each preceded by a raw slice at
   the best batch size while the service idles;
3. half saturation: an open loop at half the measured saturation rate, in slices, each preceded by a raw batch-1 slice;
   each answer's ``timings_ms`` gives where its time went (decode, queue, inference, ...).

Interleaving matters on shared or virtual machines, whose speed drifts by 10-20 % within a minute: the ratios compare
raw and HTTP figures taken seconds apart, not a raw figure from the start against HTTP figures from later. HTTP
throughput counts what completes inside each slice's window; raw throughput sums each thread's whole calls over its
own time. Targets on CPU: service/raw >= 0.85 at saturation, p99 at half
saturation <= 2x raw batch-1 latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from benchmarks.loadgen import HttpLoadClient
from benchmarks.raw_backend import BackendCalls, RawBackend, percentile
from benchmarks.server import free_port, log_tail, start_service, wait_ready
from service.core.bundle import InputSpec, ModelBundle
from service.settings import BACKEND_KINDS, PRECISIONS, Settings

__all__ = ["add_arguments", "checked_inputs", "report", "run"]


def _max_delay(value: str) -> str:
    if value == "auto":
        return value
    try:
        ms = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither 'auto' nor a number of milliseconds") from None
    if not 0 <= ms <= 1000:
        raise argparse.ArgumentTypeError(f"{value} ms is outside 0..1000")
    return value


def _concurrency(value: str) -> str:
    if value == "auto" or (value.isdigit() and int(value) >= 1):
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is neither 'auto' nor a number of clients >= 1")


def _frame_size(value: str) -> tuple[int, int]:
    width, sep, height = value.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or not (16 <= int(width) <= 20000 >= int(height) >= 16):
        raise argparse.ArgumentTypeError(f"{value!r} is not WIDTHxHEIGHT in pixels (16..20000), e.g. 2448x2048")
    return int(width), int(height)


def _service_setting(value: str) -> tuple[str, str]:
    name, sep, setting = value.partition("=")
    if not sep or not name or not all(c.isupper() or c.isdigit() or c == "_" for c in name):
        raise argparse.ArgumentTypeError(f"{value!r} is not NAME=VALUE with NAME as in AOI_NAME (e.g. GC_FREEZE=false)")
    return name, setting


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", choices=["service"], help="what to benchmark")
    parser.add_argument("--bundle", type=Path, default=Path("bundles/default"), help="model bundle directory")
    parser.add_argument("--backend", default="auto", choices=BACKEND_KINDS)
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="see `aoi serve --help`")
    parser.add_argument(
        "--concurrency",
        type=_concurrency,
        default="auto",
        help="concurrent HTTP clients at saturation; auto: 2 x instances x max batch size, so that every instance has "
        "a full batch running and another one waiting (fewer leave a CPU idle between batches)",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of HTTP load per phase")
    parser.add_argument("--rounds", type=int, default=5, help="slices per phase, each paired with a raw slice")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument(
        "--max-delay-ms", type=_max_delay, default="auto", help="the service's max_delay_ms (default auto)"
    )
    parser.add_argument(
        "--instances", type=int, default=0, help="batches in flight at once (0 = the service's auto choice)"
    )
    parser.add_argument(
        "--records",
        choices=["durable", "fast", "off"],
        default="durable",
        help="the service's inspection records: durable (make serve's default: each answer waits for its commit), "
        "fast, or off; the records go to a temporary folder",
    )
    parser.add_argument(
        "--set",
        type=_service_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another setting of the service under test, as its AOI_NAME variable (repeatable; the raw side is not "
        "affected): e.g. --set GC_FREEZE=false",
    )
    parser.add_argument("--image", type=Path, default=None, help="image to send (default: a synthetic 1.5x-input JPEG)")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    cpu = parser.add_argument_group("CPU per image (--cpu: benchmarks/bench_cpu.py)")
    cpu.add_argument(
        "--cpu",
        action="store_true",
        help="instead: CPU ms per image of the service process (records durable, fast and off) vs the raw backend at "
        "its best layout, both from process CPU time, and where the difference goes (threads; stages with py-spy)",
    )
    cpu.add_argument(
        "--profile-s",
        type=float,
        default=5.0,
        help="with --cpu: seconds of py-spy profile per records mode for the stage split (0: none)",
    )
    cpu.add_argument(
        "--frame",
        type=_frame_size,
        default=None,
        metavar="WxH",
        help="with --cpu: also a line-camera frame, e.g. "
        "2448x2048: end-to-end time and CPU per frame vs the raw backend's for its tiles",
    )


def _image_bytes(args: argparse.Namespace, spec: InputSpec, tile: tuple[int, int] | None) -> bytes:
    import cv2

    if args.image is not None:
        from service.core.errors import ImageError
        from service.core.preprocess import decode_image

        data = bytes(Path(args.image).read_bytes())
        try:  # the checks the service itself runs, so the run does not measure a stream of 4xx answers
            decode_image(data, max_pixels=Settings.model_fields["max_image_pixels"].default)
        except ImageError as exc:
            raise OSError(f"{args.image}: the service would reject it: {exc.message}") from exc
        return data

    # One model input per image: the bundle's native tile when it has one (a larger image would be tiled), else
    # 1.5x the model input (letterboxed down, as a camera frame larger than the input is).
    width, height = tile if tile is not None else (spec.width * 3 // 2, spec.height * 3 // 2)
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (max(1, height // 12), max(1, width // 12), 3), dtype=np.uint8)
    img = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    ok, buf = cv2.imencode(".jpg", img)
    if not ok:
        raise OSError("OpenCV could not encode the synthetic benchmark image")
    return bytes(buf.tobytes())


def _start_server(args: argparse.Namespace, port: int, log: IO[bytes], data_dir: Path) -> subprocess.Popen[bytes]:
    settings = {
        "MAX_BATCH_SIZE": str(args.max_batch_size),
        "MAX_DELAY_MS": str(args.max_delay_ms),
        "INSTANCES": str(args.instances),
        "QUEUE_SIZE": str(max(64, 4 * args.clients)),
        "DEADLINE_MS": "30000",
        "DATA_DIR": str(data_dir),  # records of a benchmark never mix with the real ones
    }
    if args.records == "off":
        settings["RECORDS__ENABLED"] = "false"
    else:
        settings["RECORDS__DURABILITY"] = args.records
    settings.update(args.set)
    flags = ["--backend", args.backend, "--precision", args.precision]
    return start_service(args.bundle, port, log, settings, flags)


@dataclass
class _Load:
    """HTTP results accumulated over slices."""

    latencies: list[float] = field(default_factory=list)
    errors: list[int] = field(default_factory=list)
    ok_in_window: int = 0
    window_s: float = 0.0
    stages: dict[str, list[float]] | None = None  # per answer, from its timings_ms (ms); None: not read

    def add_stages(self, body: bytes, latency_s: float) -> None:
        """The answer's own stage timings, and what the client waited beyond the server's ``total`` (HTTP in and
        out, the records commit of a durable answer, the event loop's turn)."""
        assert self.stages is not None
        timings = json.loads(body)["timings_ms"]
        for stage in _STAGES:
            self.stages.setdefault(stage, []).append(float(timings[stage]))
        self.stages.setdefault("outside", []).append(latency_s * 1e3 - float(timings["total"]))

    def summary(self, **extra: Any) -> dict[str, Any]:
        out = {
            **extra,
            "requests_ok": len(self.latencies),
            "errors": {str(c): self.errors.count(c) for c in sorted(set(self.errors))},
            "images_per_s": self.ok_in_window / self.window_s if self.window_s else 0.0,
            "latency_ms": {f"p{q}": percentile(self.latencies, q) * 1e3 for q in (50, 95, 99)},
        }
        if self.stages:
            out["stages_ms"] = {k: {"p50": percentile(v, 50), "p99": percentile(v, 99)} for k, v in self.stages.items()}
        return out


_STAGES = ("decode", "queue", "inference", "postprocess", "total")


async def _post(client: HttpLoadClient, request: bytes, load: _Load, t_end: float) -> None:
    t0 = time.perf_counter()
    status, body = await client.send(request)
    done = time.perf_counter()
    if status == 200:
        load.latencies.append(done - t0)
        load.ok_in_window += done <= t_end
        if load.stages is not None:
            load.add_stages(body, done - t0)
    else:
        load.errors.append(status)


async def _closed_loop(client: HttpLoadClient, request: bytes, n: int, duration: float, load: _Load) -> None:
    t_end = time.perf_counter() + duration

    async def worker() -> None:
        while time.perf_counter() < t_end:
            await _post(client, request, load, t_end)

    await asyncio.gather(*(worker() for _ in range(n)))
    load.window_s += duration


async def _open_loop(client: HttpLoadClient, request: bytes, rate: float, duration: float, load: _Load) -> None:
    tasks = []
    t0 = time.perf_counter()
    t_end = t0 + duration
    k = 0
    while (now := time.perf_counter()) < t_end:
        due = t0 + k / rate
        if due > now:
            await asyncio.sleep(due - now)
        tasks.append(asyncio.ensure_future(_post(client, request, load, t_end)))
        k += 1
    await asyncio.gather(*tasks)
    load.window_s += duration


async def _http(args: argparse.Namespace, data: bytes, raw: RawBackend, best_batch: int) -> dict[str, Any]:
    with (
        tempfile.TemporaryFile(prefix="aoi-bench-service-") as log,
        tempfile.TemporaryDirectory(prefix="aoi-bench-data-") as data_dir,
    ):
        return await _http_with_log(args, data, raw, best_batch, log, Path(data_dir))


_COMMITS, _GC = "aoi_records_commit_seconds", "aoi_gc_pause_seconds"


def _histograms(metrics_text: str) -> dict[str, dict[float, float]]:
    """Cumulative counts by bucket bound of the records commit and GC pause histograms (summed over their labels;
    a histogram the service does not export is missing)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name in (_COMMITS, _GC):
            buckets = out.setdefault(family.name, {})
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    le = float(sample.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + sample.value
    return out


def _histogram_summary(before: dict[float, float], after: dict[float, float]) -> dict[str, Any] | None:
    """Observations between two scrapes: how many, and the bucket bounds holding their p50, p99 and maximum (a
    histogram gives bounds, not values), with how many took over 10, 20 and 50 ms."""
    counts = {le: after[le] - before.get(le, 0.0) for le in sorted(after)}
    total = counts.get(float("inf"), 0.0)
    if not total:
        return None

    def bound(q: float) -> float:
        return next(le for le, n in counts.items() if n >= q * total) * 1e3

    over = {f"over_{ms}ms": int(total - counts[ms / 1e3]) for ms in (10, 20, 50) if ms / 1e3 in counts}
    return {"count": int(total), "p50_ms_at_most": bound(0.5), "p99_ms_at_most": bound(0.99),
            "max_ms_at_most": bound(1.0), **over}  # fmt: skip


async def _scrape(client: HttpLoadClient) -> dict[str, dict[float, float]]:
    status, body = await client.get("/metrics")
    return _histograms(body.decode()) if status == 200 else {}


def _between(
    before: dict[str, dict[float, float]], after: dict[str, dict[float, float]], name: str
) -> dict[str, Any] | None:
    return _histogram_summary(before.get(name, {}), after[name]) if name in after else None


async def _http_with_log(
    args: argparse.Namespace, data: bytes, raw: RawBackend, best_batch: int, log: IO[bytes], data_dir: Path
) -> dict[str, Any]:
    port = free_port()
    proc = _start_server(args, port, log, data_dir)
    client = HttpLoadClient("127.0.0.1", port, max_connections=args.clients * 4 + 8)
    request = client.build_request("POST", "/v1/inspect", "127.0.0.1", data, "image/jpeg")
    slice_s = args.duration / args.rounds
    sat, half = _Load(), _Load(stages={})  # half saturation: where each answer's time went
    raw_b1 = BackendCalls()
    rounds: list[dict[str, float]] = []
    commits, gc_sat, gc_half = None, None, None
    try:
        await wait_ready(client, proc, log)
        status, body = await client.get("/v1/model")
        info = json.loads(body) if status == 200 else {}
        service = {k: info.get(k) for k in ("backend", "device", "instances", "intra_op_threads", "max_delay_ms")}
        warm = _Load()
        await _closed_loop(client, request, args.clients, min(2.0, args.duration / 5), warm)
        if not warm.latencies:
            statuses = warm.summary()["errors"]
            raise RuntimeError(f"every warm-up request failed (HTTP status: count {statuses}); log: {log_tail(log)}")
        scraped = await _scrape(client)
        for r in range(args.rounds):  # raw slice (the service idles), then an HTTP slice
            raw_rate = raw.calls(best_batch, slice_s / 2, raw.instances).images_per_s
            before = sat.ok_in_window
            await _closed_loop(client, request, args.clients, slice_s, sat)
            rounds.append({"raw": raw_rate, "http": (sat.ok_in_window - before) / slice_s})
            _note(f"saturation {r + 1}/{args.rounds}: raw {raw_rate:.1f} images/s, HTTP {rounds[-1]['http']:.1f}")
        rate = max(0.5, sat.ok_in_window / sat.window_s / 2)
        prev, scraped = scraped, await _scrape(client)
        gc_sat = _between(prev, scraped, _GC)
        for r in range(args.rounds):
            raw_b1.latencies += raw.calls(1, slice_s / 4, 1).latencies
            await _open_loop(client, request, rate, slice_s, half)
            _note(f"half saturation {r + 1}/{args.rounds}: open loop at {rate:.1f} images/s")
        prev, scraped = scraped, await _scrape(client)
        commits, gc_half = _between(prev, scraped, _COMMITS), _between(prev, scraped, _GC)
    finally:
        await client.close()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {
        "service": service,
        "saturation": sat.summary(concurrency=args.clients, gc_pauses=gc_sat),
        "half_saturation": half.summary(offered_rate=rate, records_commits=commits, gc_pauses=gc_half),
        "interleaved_raw": {
            "batch": best_batch,
            "images_per_s": float(np.mean([r["raw"] for r in rounds])),
            "batch1_alone_latency_ms_p50": percentile(raw_b1.latencies, 50) * 1e3,
            "rounds": rounds,
        },
    }


def _table(result: dict[str, Any]) -> str:
    raw, http, inter = result["raw"], result["http"], result["http"]["interleaved_raw"]
    info, svc = raw["info"], http["service"]
    lines = [
        f"backend {info['backend']} on {info['device']} ({info['precision']}), {info['instances']} instance(s)"
        + (f", {info['intra_op_threads']} intra-op thread(s) each" if info.get("intra_op_threads") else ""),
        f"service: {svc.get('instances')} instance(s), max_delay_ms {svc.get('max_delay_ms')}; "
        f"{result['model_inputs_per_image']} model input(s) per image; records {result['records']}; "
        f"{result['concurrency']} clients at saturation"
        + "".join(f"; {k}={v}" for k, v in result["service_settings"].items()),
        "",
        f"{'raw batch':>10} {'images/s':>10} {'ms/batch alone':>15} {'ms/batch busy':>14}",
    ]
    lines += [
        f"{r['batch']:>10} {r['images_per_s']:>10.1f} {r['latency_ms_p50']:>15.2f} {r['busy_latency_ms_p50']:>14.2f}"
        for r in raw["rows"]
    ]
    lines += ["", f"{'http phase':>22} {'images/s':>10} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>8}"]
    for name, key in (("saturation", "saturation"), ("half saturation", "half_saturation")):
        h = http[key]
        lat = h["latency_ms"]
        errs = sum(h["errors"].values())
        lines.append(
            f"{name:>22} {h['images_per_s']:>10.1f} {lat['p50']:>8.2f} {lat['p95']:>8.2f} {lat['p99']:>8.2f} {errs:>8}"
        )
    per_round = [r["http"] / r["raw"] for r in inter["rounds"] if r["raw"]]
    t = result["targets"]
    lines += [
        "",
        f"raw interleaved with the HTTP slices: batch {inter['batch']} {inter['images_per_s']:.1f} images/s, "
        f"batch 1 alone {inter['batch1_alone_latency_ms_p50']:.2f} ms",
        f"service/raw throughput ratio at saturation: {t['ratio']:.3f} (target >= 0.85; per round "
        f"{min(per_round, default=float('nan')):.3f}..{max(per_round, default=float('nan')):.3f})",
        f"p99 at half saturation / raw batch-1 latency: {t['p99_over_raw_b1']:.2f} (target <= 2)",
    ]
    stages = http["half_saturation"].get("stages_ms")
    if stages:
        names = {"total": "server total", "outside": "outside it (HTTP, records wait)"}
        lines.append(
            "half saturation per answer, ms p50 / p99: "
            + ", ".join(f"{names.get(k, k)} {v['p50']:.2f} / {v['p99']:.2f}" for k, v in stages.items())
        )
    for what, phase, key in (
        ("records commits (a durable answer waits for its own)", "half saturation", "records_commits"),
        ("garbage collector pauses (every thread stops)", "saturation", "gc_pauses"),
        ("garbage collector pauses", "half saturation", "gc_pauses"),
    ):
        h = http[phase.replace(" ", "_")].get(key)
        if h:
            over = ", ".join(f"{v} over {k[5:]}" for k, v in h.items() if k.startswith("over_"))
            lines.append(
                f"{what} at {phase}: {h['count']}, p50 <= {h['p50_ms_at_most']:g} ms, p99 <= "
                f"{h['p99_ms_at_most']:g} ms, longest <= {h['max_ms_at_most']:g} ms ({over})"
            )
    return "\n".join(lines)


def _raw_settings(args: argparse.Namespace) -> Settings:
    """What the raw backend loads from: the flags, and every other setting at its default, as the service subprocess
    gets them (built without reading ``AOI_*`` variables, which :func:`_start_server` keeps from the service too;
    :func:`run` has range-checked the flags)."""
    return Settings.model_construct(
        bundle=args.bundle,
        backend=args.backend,
        precision=args.precision,
        max_batch_size=args.max_batch_size,
        instances=args.instances,
    )


def _inputs_per_image(data: bytes, bundle: ModelBundle) -> int:
    """Model inputs the service makes of the benchmark image (1, or its tiles when it is larger than the native
    field), so the service's images/s compare with the raw backend's inputs/s."""
    from service.core.frames import TilingSettings, plan_frame, resolve_policy
    from service.core.preprocess import probe_image

    _, width, height = probe_image(data)
    if width is None or height is None:
        return 1
    return plan_frame(width, height, resolve_policy(bundle, TilingSettings())).inputs


def _note(text: str) -> None:
    """A progress line on stderr (phases take seconds to minutes; also when stderr is not a terminal)."""
    sys.stderr.write(f"aoi bench: {text}\n")
    sys.stderr.flush()


def checked_inputs(args: argparse.Namespace) -> tuple[ModelBundle, bytes, int] | int:
    """The arguments checked, the bundle loaded and the test image made (with its model inputs per image), or the
    exit status after the error was written: what ``aoi bench service`` and ``--cpu`` both start from."""
    from service.core.bundle import BundleError, load_bundle

    if args.duration <= 0 or args.rounds < 1 or not 0 <= args.instances <= 64 or not 1 <= args.max_batch_size <= 256:
        sys.stderr.write(
            "aoi bench: error: --rounds must be >= 1, --duration > 0, --instances 0..64 and --max-batch-size 1..256\n"
        )
        return 2
    if args.json is not None and (problem := _unwritable(args.json)):
        sys.stderr.write(f"aoi bench: error: {args.json}: {problem}\n")
        return 2
    try:
        bundle = load_bundle(args.bundle)
        tile = (bundle.tiling.tile_width, bundle.tiling.tile_height) if bundle.tiling is not None else None
        data = _image_bytes(args, bundle.input, tile)
        return bundle, data, _inputs_per_image(data, bundle)
    except BundleError as exc:
        sys.stderr.write(f"aoi bench: error: {exc.path}: {exc.problem}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"aoi bench: error: {exc}\n")
        return 1


def run(args: argparse.Namespace) -> int:
    from service.core.errors import BackendUnavailable

    checked = checked_inputs(args)
    if isinstance(checked, int):
        return checked
    bundle, data, inputs_per_image = checked
    try:
        raw = RawBackend(_raw_settings(args), bundle)
    except (BackendUnavailable, OSError) as exc:
        sys.stderr.write(f"aoi bench: error: {exc}\n")
        return 1
    info = raw.info()
    args.clients = int(args.concurrency) if args.concurrency != "auto" else 2 * raw.instances * args.max_batch_size
    try:
        _note(f"raw sweep over batch sizes {list(raw.backend.batch_sizes)} ...")
        rows = raw.sweep(max(0.5, args.duration / 3 / len(raw.backend.batch_sizes)))
        best_batch = max(rows, key=lambda r: r["images_per_s"])["batch"]
        _note(f"best raw batch {best_batch}; starting the service and {args.rounds} interleaved rounds ...")
        http = asyncio.run(_http(args, data, raw, best_batch))
    except (RuntimeError, OSError) as exc:
        sys.stderr.write(f"aoi bench: error: {exc}\n")
        return 1
    finally:
        raw.close()
    inter = http["interleaved_raw"]
    result = {
        "bundle": str(args.bundle),
        "concurrency": args.clients,
        "records": args.records,
        "service_settings": dict(args.set),
        "duration_s": args.duration,
        "rounds": args.rounds,
        "max_batch_size": args.max_batch_size,
        "model_inputs_per_image": inputs_per_image,
        "raw": {"info": info, "rows": rows},
        "http": http,
        "targets": {
            # raw counts model inputs; an image the service tiles is several of them
            "ratio": http["saturation"]["images_per_s"] * inputs_per_image / inter["images_per_s"],
            "p99_over_raw_b1": http["half_saturation"]["latency_ms"]["p99"] / inter["batch1_alone_latency_ms_p50"],
        },
    }
    return report(_table(result), result, args.json)


def report(table: str, result: dict[str, Any], json_path: Path | None) -> int:
    """Print ``table`` and write ``result`` as JSON to ``json_path`` (when given); the exit status."""
    sys.stdout.write(table + "\n")
    if json_path is not None:
        try:
            json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            sys.stderr.write(f"aoi bench: error: {json_path}: cannot write the results ({exc.strerror})\n")
            return 1
        sys.stdout.write(f"wrote {json_path}\n")
    return 0


def _unwritable(path: Path) -> str | None:
    """Why the results could not be written to ``path`` (checked before a run of minutes), or None."""
    if path.is_dir():
        return "is a directory"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create its folder ({exc.strerror})"
    target = path if path.exists() else path.parent
    return None if os.access(target, os.W_OK) else "not writable"
