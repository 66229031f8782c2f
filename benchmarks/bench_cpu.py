"""`aoi bench service --cpu`: CPU milliseconds per image of the service process against the raw backend at its best
layout, both from process CPU time (user + system), and where the difference goes.

    aoi bench service --cpu --bundle bundles/default [--image scratches_10.jpg] [--frame 2448x2048] [--json out.json]
    python benchmarks/bench_cpu.py --bundle bundles/default ...     # the same

In one run:

1. three services start (records durable, fast and off; each a real uvicorn subprocess on 127.0.0.1, the two not
   under load idle); the backend and precision the durable one picked are read from ``/v1/model``;
2. that backend and precision are loaded in this process at each layout worth trying (instances 1 and 2, and the
   service's own, x batch 1, 4, 8 and the largest served) and measured: images/s with every instance busy and this
   process's CPU time per image (nothing else runs in it meanwhile). The best layout has the most images/s;
3. ``--rounds`` rounds of a raw slice at the best layout (and one at the service's own layout, instances x largest
   batch, when that differs), then a closed-loop slice (``--concurrency`` keep-alive clients POSTing the image) on
   each service in turn. A service's CPU per image is its process's user + system time across the slice (psutil:
   every thread, the runtime's own included; the load generator lives in this process and is not counted) over the
   answers it gave. In the model = the service's CPU inside the backend's call (its
   ``aoi_backend_call_cpu_seconds_total``, read around each slice) plus its runtime's native threads; outside the
   model = the service's CPU - in the model, both from the service itself, so the model's cost drifting between slices
   (by several ms per image on this VM) does not move it. The difference to the raw backend's CPU at the service's
   layout is printed beside it. The images/s ratio is against the best raw layout. Figures seconds apart;
4. where a service's CPU goes, exactly per thread (kernel accounting: the event loop, the ``aoi-infer`` threads, the
   decode pool, the records writer, the runtime's native threads) and, when ``py-spy`` is installed (the ``dev``
   extra; ``--profile-s 0`` skips it), per stage from a sampling profile of each service under the same load
   (``py-spy record --format raw``, 100 Hz, idle samples dropped): each thread's CPU time is shared out over the stages
   of its samples (:mod:`benchmarks.cpu_profile`), scaled to the unprofiled slices' CPU per image. A share is good to
   a few percent at a few thousand samples; native threads hold no Python frames and count as inference whole;
5. half saturation (the durable service, an open loop at half its rate): p50 / p99 against the raw batch-1 latency
   (one call alone, at the service's layout);
6. with ``--frame WxH``: a line-camera frame (:func:`benchmarks.bench_tiling.make_frame`) posted by one client to the
   durable service: end-to-end time and CPU per frame against the raw time and CPU of its tiles at the best layout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from benchmarks.cpu_profile import (
    RUNTIME,
    CpuTally,
    dump_names,
    parse_raw,
    py_spy,
    read_cpu,
    record,
    stage_split,
    thread_split,
    unplaced,
)
from benchmarks.loadgen import HttpLoadClient
from benchmarks.raw_backend import RawBackend, percentile
from benchmarks.server import free_port, wait_ready
from benchmarks.service_bench import (
    _closed_loop,
    _inputs_per_image,
    _Load,
    _note,
    _open_loop,
    _start_server,
    checked_inputs,
    report,
)
from service.core.bundle import ModelBundle
from service.settings import Settings

__all__ = ["MODES", "run"]

MODES = ("durable", "fast", "off")
_REPO = Path(__file__).resolve().parents[1]


@dataclass
class _Service:
    mode: str
    proc: subprocess.Popen[bytes]
    client: HttpLoadClient
    request: bytes
    log: IO[bytes]
    tally: CpuTally = field(default_factory=CpuTally)
    names: dict[int, str] = field(default_factory=dict)  # Python threads by OS thread id
    counts_model: bool = True  # serves aoi_backend_call_cpu_seconds_total (the bare HTTP servers do not)

    async def cpu_slice(self, clients: int, seconds: float, tally: CpuTally | None = None) -> _Load:
        """A closed-loop slice; its CPU, the part of it inside the backend's call and the answers go to ``tally``
        (default: the service's own)."""
        load = _Load()
        model_before = await backend_call_cpu_s(self.client) if self.counts_model else 0.0
        before = read_cpu(self.proc.pid)
        await _closed_loop(self.client, self.request, clients, seconds, load)
        after = read_cpu(self.proc.pid)
        model_s = await backend_call_cpu_s(self.client) - model_before if self.counts_model else 0.0
        (self.tally if tally is None else tally).add(before, after, len(load.latencies), model_s)
        return load


_BACKEND_CPU = re.compile(rb"^aoi_backend_call_cpu_seconds_total ([0-9.eE+-]+)$", re.MULTILINE)


async def backend_call_cpu_s(client: HttpLoadClient) -> float:
    """The service's CPU seconds inside the backend's call so far (``aoi_backend_call_cpu_seconds_total``)."""
    status, body = await client.get("/metrics")
    found = _BACKEND_CPU.search(body) if status == 200 else None
    if found is None:
        raise RuntimeError(f"GET /metrics (HTTP {status}) has no aoi_backend_call_cpu_seconds_total")
    return float(found.group(1))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


async def _start(args: argparse.Namespace, data: bytes, stack: contextlib.AsyncExitStack) -> dict[str, _Service]:
    """The three services, started together and waited for."""
    services = {}
    for mode in MODES:
        log = stack.enter_context(tempfile.TemporaryFile(prefix=f"aoi-bench-cpu-{mode}-"))  # noqa: SIM115 (closed by the stack)
        data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="aoi-bench-data-"))
        port = free_port()
        proc = _start_server(argparse.Namespace(**{**vars(args), "records": mode}), port, log, Path(data_dir))
        stack.callback(_stop, proc)
        client = HttpLoadClient("127.0.0.1", port, max_connections=args.clients * 4 + 8, timeout_s=300)
        stack.push_async_callback(client.close)
        request = client.build_request("POST", "/v1/inspect", "127.0.0.1", data, "image/jpeg")
        services[mode] = _Service(mode, proc, client, request, log)
    for svc in services.values():
        await wait_ready(svc.client, svc.proc, svc.log)
    return services


def _raw_slice(raw: RawBackend, batch: int, seconds: float, threads: int = 0) -> tuple[CpuTally, list[float], float]:
    """``threads`` threads (0: one per instance) running batches of ``batch``: this process's CPU and images, the
    calls' latencies and images/s."""
    tally = CpuTally()
    before = read_cpu()
    calls = raw.calls(batch, seconds, threads or raw.instances)
    tally.add(before, read_cpu(), sum(n for n, _ in calls.per_thread))
    return tally, calls.latencies, calls.images_per_s


def _load_raws(
    args: argparse.Namespace, bundle: ModelBundle, model: dict[str, Any], stack: contextlib.AsyncExitStack
) -> dict[int, RawBackend]:
    """The raw backend (the service's kind and precision) at instances 1, 2 and the service's own, by instances."""
    raws: dict[int, RawBackend] = {}
    for n in sorted({1, 2, int(model["instances"])}):
        settings = Settings.model_construct(
            bundle=args.bundle,
            backend=model["backend"],
            precision=model["precision"],
            max_batch_size=args.max_batch_size,
            instances=n,
        )
        raw = RawBackend(settings, bundle)
        stack.callback(raw.close)
        raws.setdefault(raw.instances, raw)  # capped by the backend: the same layout again
    return raws


def _layouts(raws: dict[int, RawBackend], seconds: float, passes: int = 2) -> list[dict[str, Any]]:
    """Each layout (instances x batch 1, 4, 8 and the largest served) in ``passes`` interleaved passes: images/s
    (mean of the passes) and CPU ms per image (over all of them)."""
    layouts = []
    for n, raw in raws.items():
        sizes = raw.backend.batch_sizes
        layouts += [(n, b) for b in sorted({b for b in sizes if b in (1, 4, 8)} | {sizes[-1]})]
    tallies = {key: CpuTally() for key in layouts}
    rates: dict[tuple[int, int], list[float]] = {key: [] for key in layouts}
    for _ in range(passes):
        for n, b in layouts:
            tally, _, rate = _raw_slice(raws[n], b, seconds / passes)
            tallies[n, b].merge(tally)
            rates[n, b].append(rate)
    rows = []
    for n, b in layouts:
        ms, lo, hi = tallies[n, b].ms_per_image(), min(rates[n, b]), max(rates[n, b])
        rows.append({"instances": n, "batch": b, "images_per_s": float(np.mean(rates[n, b])), "cpu_ms_per_image": ms})
        _note(f"raw {n} x batch {b}: {rows[-1]['images_per_s']:.1f} images/s ({lo:.1f}..{hi:.1f}), {ms:.2f} CPU ms")
    return rows


_Layout = tuple[RawBackend, int]  # a raw backend and the batch size it runs


async def _rounds(
    args: argparse.Namespace, services: dict[str, _Service], best: _Layout, own: _Layout
) -> tuple[list[dict[str, Any]], dict[str, CpuTally]]:
    """Raw slices at the best layout and at the service's own (instances x largest batch; skipped when the same),
    then each service's slice, ``--rounds`` times."""
    slice_s = args.duration / args.rounds
    raw_tallies = {"raw": CpuTally(), "raw_service_layout": CpuTally()}
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        row: dict[str, Any] = {}
        for key, (raw, batch) in (("raw", best), ("raw_service_layout", own)):
            if key == "raw_service_layout" and own == best:
                row[key] = row["raw"]
                continue
            one, _, rate = _raw_slice(raw, batch, slice_s)
            raw_tallies[key].merge(one)
            row[key] = {"images_per_s": rate, "cpu_ms_per_image": one.ms_per_image()}
        for mode, svc in services.items():
            one = CpuTally()
            load = await svc.cpu_slice(args.clients, slice_s, one)
            svc.tally.merge(one)
            row[mode] = {
                "images_per_s": load.ok_in_window / slice_s,
                "cpu_ms_per_image": one.ms_per_image(),
                "model_ms_per_image": one.model_ms_per_image(),
                "errors": len(load.errors),
            }
        rounds.append(row)
        _note(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(f"{k} {v['images_per_s']:.0f}/s {v['cpu_ms_per_image']:.2f} ms" for k, v in row.items())
        )
    if own == best:
        raw_tallies["raw_service_layout"] = raw_tallies["raw"]
    return rounds, raw_tallies


async def _profile(svc: _Service, clients: int, seconds: float, exe: str | None) -> dict[str, Any]:
    """Per thread role from the unprofiled slices (exact); per stage from a py-spy profile under the same load,
    scaled to the unprofiled CPU per image. Without py-spy, threads are told apart only as the main thread or not."""
    pid = svc.proc.pid
    svc.names = dump_names(exe, pid) if exe else {}
    if svc.names:
        out: dict[str, Any] = {"threads_ms": thread_split(svc.tally.thread_ms(), svc.names)}
    else:  # only the main thread is known (its id is the process's)
        split = thread_split(svc.tally.thread_ms(), {pid: "MainThread"})
        out = {
            "threads_ms": {("other threads (py-spy names them)" if k == RUNTIME else k): v for k, v in split.items()}
        }
    if exe is None or seconds <= 0:
        return out
    with tempfile.TemporaryDirectory(prefix="aoi-bench-cpu-profile-") as tmp:
        path = Path(tmp) / "profile.txt"
        spy = record(exe, pid, max(1, round(seconds)), path)
        tally = CpuTally()
        await svc.cpu_slice(clients, max(1.0, round(seconds)), tally)
        try:
            _, err = spy.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            err = b"timed out"
        if spy.returncode != 0 or not path.exists():
            out["profile_error"] = err.decode(errors="replace").strip()[-300:]
            return out
        samples = parse_raw(path.read_text(errors="replace"))
    names = {**svc.names, **{s.tid: s.thread for s in samples}}
    stages = stage_split(samples, tally.thread_ms(), names)
    scale = svc.tally.ms_per_image() / tally.ms_per_image() if tally.images else float("nan")
    out["stages_ms"] = {k: v * scale for k, v in stages.items()}
    out["profile"] = {
        "samples": sum(s.count for s in samples),
        "seconds": round(seconds),
        "cpu_ms_per_image_while_profiled": tally.ms_per_image(),
        "unplaced_top": unplaced(samples),
    }
    return out


async def _half(args: argparse.Namespace, svc: _Service, raw: RawBackend, rate: float) -> dict[str, Any]:
    """An open loop at ``rate`` on ``svc``, each slice preceded by raw batch-1 calls alone."""
    slice_s = args.duration / args.rounds
    load, b1 = _Load(), []
    for _ in range(args.rounds):
        b1 += _raw_slice(raw, 1, slice_s / 4, threads=1)[1]
        await _open_loop(svc.client, svc.request, rate, slice_s, load)
    p50, p99 = percentile(load.latencies, 50) * 1e3, percentile(load.latencies, 99) * 1e3
    raw_b1 = percentile(b1, 50) * 1e3
    return {
        "offered_rate": rate,
        "p50_ms": p50,
        "p99_ms": p99,
        "errors": len(load.errors),
        "raw_batch1_ms_p50": raw_b1,
        "p99_over_raw_b1": p99 / raw_b1,
    }


async def _frame(args: argparse.Namespace, svc: _Service, bundle: ModelBundle, raw: dict[str, float]) -> dict[str, Any]:
    """A line-camera frame posted by one client to ``svc``: time and CPU per frame vs raw time and CPU of its tiles."""
    from benchmarks.bench_tiling import make_frame

    width, height = args.frame
    data = make_frame(width, height, None, 95)
    tiles = _inputs_per_image(data, bundle)
    request = svc.client.build_request("POST", "/v1/inspect", "127.0.0.1", data, "image/jpeg")
    frame_svc = _Service(svc.mode, svc.proc, svc.client, request, svc.log)
    await frame_svc.cpu_slice(1, 0.1, CpuTally())  # one warm frame
    load = await frame_svc.cpu_slice(1, max(3.0, args.duration / 2))
    if not load.latencies:
        raise RuntimeError(f"the {width}x{height} frame was not answered: HTTP {load.errors[:3]}")
    e2e_s = percentile(load.latencies, 50)
    raw_s = tiles / raw["images_per_s"]
    cpu_frame = frame_svc.tally.ms_per_image()
    model_frame = frame_svc.tally.model_ms_per_image()
    return {
        "size": [width, height],
        "tiles": tiles,
        "frames": len(load.latencies),
        "e2e_s_p50": e2e_s,
        "raw_s_for_tiles": raw_s,
        "e2e_over_raw": e2e_s / raw_s,
        "cpu_ms_per_frame": cpu_frame,
        "model_ms_per_frame": model_frame,
        "outside_ms_per_tile": (cpu_frame - model_frame) / tiles,
        "outside_by_subtraction_ms_per_tile": cpu_frame / tiles - raw["cpu_ms_per_image"],
    }


async def _http_floor(
    args: argparse.Namespace, data: bytes, app: str, seconds: float, rate: float
) -> tuple[float, float]:
    """CPU ms per request of a bare uvicorn server (:mod:`benchmarks.bare_http`): under the same closed loop as the
    services (as many requests as it can take: its per-request costs shared out), and under an open loop at ``rate``
    requests/s, the rate the service answers at (each request on its own, as the service sees them)."""
    with tempfile.TemporaryFile(prefix="aoi-bench-cpu-floor-") as log:
        cmd = [sys.executable, "-m", "uvicorn", f"benchmarks.bare_http:{app}", "--app-dir", str(_REPO)]
        cmd += ["--host", "127.0.0.1", "--port", str(port := free_port()), "--loop", "uvloop", "--http", "httptools"]
        proc = subprocess.Popen(
            [*cmd, "--no-access-log", "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=log
        )
        client = HttpLoadClient("127.0.0.1", port, max_connections=args.clients * 4 + 8, timeout_s=60)
        try:
            await wait_ready(client, proc, log)
            request = client.build_request("POST", "/v1/inspect", "127.0.0.1", data, "image/jpeg")
            bare = _Service(app, proc, client, request, log, counts_model=False)
            await bare.cpu_slice(args.clients, 1.0, CpuTally())  # warm-up
            paced = CpuTally()
            for _ in range(args.rounds):
                await bare.cpu_slice(args.clients, seconds)
                load, before = _Load(), read_cpu(proc.pid)
                await _open_loop(client, request, rate, seconds, load)
                paced.add(before, read_cpu(proc.pid), len(load.latencies))
            return bare.tally.ms_per_image(), paced.ms_per_image()
        finally:
            await client.close()
            _stop(proc)


def _pixel_loop(data: bytes, bundle: ModelBundle, seconds: float) -> tuple[float, float]:
    """This thread's CPU ms per image decoding ``data`` and letterboxing it into a model-input row, as the service
    does (:func:`decode_frame`, :func:`fill_input`, OpenCV on one thread as ``opencv_threads`` sets it)."""
    import cv2

    from service.core.preprocess import decode_frame, fill_input, new_batch

    row = new_batch(bundle.input, 1)[0]
    limit = Settings.model_construct().max_image_pixels
    decode_s = fill_s = 0.0
    n, t_end, threads = 0, time.perf_counter() + seconds, cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        while time.perf_counter() < t_end or n < 20:
            c0 = time.thread_time()
            frame = decode_frame(data, max_pixels=limit)
            c1 = time.thread_time()
            fill_input(row, frame, (0, 0, frame.width, frame.height), bundle.input)
            decode_s, fill_s, n = decode_s + c1 - c0, fill_s + time.thread_time() - c1, n + 1
    finally:
        cv2.setNumThreads(threads)
    return decode_s * 1e3 / n, fill_s * 1e3 / n


async def _floor(
    args: argparse.Namespace, data: bytes, bundle: ModelBundle, own: _Layout, rate: float
) -> dict[str, Any]:
    """What a server of this design cannot avoid per image on this machine, measured in this run: uvicorn's own
    CPU per request (a bare ASGI app) and with a FastAPI route, alone, at their saturation and at ``rate`` (the
    durable service's images/s); decoding and letterboxing the image, alone and beside the raw backend running at the
    service's layout on the other cores (as in the service: they share the cores and the caches). A lower bound:
    batching, NMS, records and the answer come on top."""
    slice_s = args.duration / args.rounds
    asgi_ms, asgi_paced_ms = await _http_floor(args, data, "asgi", slice_s, rate)
    fastapi_ms, fastapi_paced_ms = await _http_floor(args, data, "fastapi_app", slice_s, rate)
    decode_alone, fill_alone = _pixel_loop(data, bundle, slice_s / 2)
    raw, batch = own
    beside = threading.Thread(target=raw.calls, args=(batch, slice_s, raw.instances), daemon=True)
    beside.start()
    decode_beside, fill_beside = _pixel_loop(data, bundle, slice_s * 0.8)
    beside.join()
    return {
        "http_asgi_ms": asgi_ms,
        "http_fastapi_ms": fastapi_ms,
        "paced_rate": rate,
        "http_asgi_paced_ms": asgi_paced_ms,
        "http_fastapi_paced_ms": fastapi_paced_ms,
        "decode_ms_alone": decode_alone,
        "letterbox_ms_alone": fill_alone,
        "decode_ms_beside_model": decode_beside,
        "letterbox_ms_beside_model": fill_beside,
        "floor_ms": asgi_ms + decode_beside + fill_beside,
        "floor_with_fastapi_ms": fastapi_ms + decode_beside + fill_beside,
        "floor_paced_ms": asgi_paced_ms + decode_beside + fill_beside,
        "floor_paced_with_fastapi_ms": fastapi_paced_ms + decode_beside + fill_beside,
    }


async def _measure(args: argparse.Namespace, data: bytes, bundle: ModelBundle) -> dict[str, Any]:
    async with contextlib.AsyncExitStack() as stack:
        services = await _start(args, data, stack)
        durable = services["durable"]
        status, body = await durable.client.get("/v1/model")
        if status != 200:
            raise RuntimeError(f"GET /v1/model answered HTTP {status}: {body[:200]!r}")
        model = json.loads(body)
        if args.concurrency == "auto":
            args.clients = 2 * int(model["instances"]) * args.max_batch_size
        for svc in services.values():  # warm-up, not counted
            warm = await svc.cpu_slice(args.clients, min(2.0, args.duration / 5), CpuTally())
            if not warm.latencies:
                raise RuntimeError(f"every warm-up request of records {svc.mode} failed: HTTP {warm.errors[:3]}")
        _note(f"services up ({model['backend']} {model['precision']}, {model['instances']} instance(s)); raw layouts")
        raws = _load_raws(args, bundle, model, stack)
        rows = _layouts(raws, max(1.0, args.duration / args.rounds))
        best = max(rows, key=lambda r: float(r["images_per_s"]))
        own_n = int(model["instances"]) if int(model["instances"]) in raws else max(raws)
        best_layout, own = (raws[best["instances"]], best["batch"]), (raws[own_n], max(model["batch_sizes"]))
        rounds, raw_tallies = await _rounds(args, services, best_layout, own)
        exe = py_spy() if args.profile_s > 0 else None
        where = {mode: await _profile(svc, args.clients, args.profile_s, exe) for mode, svc in services.items()}
        rate = float(np.mean([r["durable"]["images_per_s"] for r in rounds])) / 2
        _note(f"half saturation: an open loop at {rate:.1f} images/s on records durable")
        half = await _half(args, durable, own[0], max(0.5, rate))
        best_now = {
            "images_per_s": float(np.mean([r["raw"]["images_per_s"] for r in rounds])),
            "cpu_ms_per_image": raw_tallies["raw"].ms_per_image(),
        }
        frame = await _frame(args, durable, bundle, best_now) if args.frame else None
        _note("the floor: bare HTTP servers, decoding and letterboxing alone and beside the model")
        floor = await _floor(args, data, bundle, own, 2 * rate) if args.inputs == 1 else None
        modes = {
            mode: _mode_summary(mode, svc, rounds, raw_tallies["raw_service_layout"], where[mode], args.inputs)
            for mode, svc in services.items()
        }
    return {
        "model": {
            k: model.get(k)
            for k in ("backend", "device", "precision", "instances", "batch_sizes", "intra_op_threads", "max_delay_ms")
        },
        "concurrency": args.clients,
        "raw_layouts": rows,
        "best_layout": {
            **best,
            "cpu_ms_per_image_interleaved": best_now["cpu_ms_per_image"],
            "images_per_s_interleaved": best_now["images_per_s"],
        },
        "service_layout": {
            "instances": own_n,
            "batch": own[1],
            "cpu_ms_per_image_interleaved": raw_tallies["raw_service_layout"].ms_per_image(),
            "images_per_s_interleaved": float(np.mean([r["raw_service_layout"]["images_per_s"] for r in rounds])),
        },
        "modes": modes,
        "rounds": rounds,
        "half_saturation": half,
        "frame": frame,
        "floor": floor,
        "profiler": exe and "py-spy",
    }


def _mode_summary(
    mode: str, svc: _Service, rounds: list[dict[str, Any]], raw: CpuTally, where: dict[str, Any], inputs: int
) -> dict[str, Any]:
    """A mode's figures; an image the service tiles is ``inputs`` model inputs of the raw backend.

    Outside the model is measured in the service: its process CPU less the CPU inside the backend's call (its own
    counter) and its runtime's native threads, so it does not move with the model's cost from one slice to the next;
    the difference to the raw backend's CPU in slices beside it (``outside_by_subtraction``) does, by a few ms."""
    ratios = [r[mode]["images_per_s"] * inputs / r["raw"]["images_per_s"] for r in rounds if r["raw"]["images_per_s"]]
    runtime = where.get("threads_ms", {}).get(RUNTIME, 0.0)
    outside = [r[mode]["cpu_ms_per_image"] - r[mode]["model_ms_per_image"] - runtime for r in rounds]
    subtracted = [r[mode]["cpu_ms_per_image"] - inputs * r["raw_service_layout"]["cpu_ms_per_image"] for r in rounds]
    return {
        "images_per_s": float(np.mean([r[mode]["images_per_s"] for r in rounds])),
        "errors": sum(r[mode]["errors"] for r in rounds),
        "cpu_ms_per_image": svc.tally.ms_per_image(),
        "model_ms_per_image": svc.tally.model_ms_per_image() + runtime,
        "outside_ms_per_image": svc.tally.ms_per_image() - svc.tally.model_ms_per_image() - runtime,
        "outside_ms_per_round": [min(outside), max(outside)],
        "outside_by_subtraction_ms_per_image": svc.tally.ms_per_image() - inputs * raw.ms_per_image(),
        "outside_by_subtraction_per_round": [min(subtracted), max(subtracted)],
        "ratio": float(np.mean(ratios)) if ratios else float("nan"),
        "ratio_per_round": [min(ratios, default=float("nan")), max(ratios, default=float("nan"))],
        **where,
    }


def _table(result: dict[str, Any]) -> str:
    m, best, modes = result["model"], result["best_layout"], result["modes"]
    lines = [
        f"service: {m['backend']} on {m['device']} ({m['precision']}), {m['instances']} instance(s), batch sizes "
        f"{m['batch_sizes']}, max_delay_ms {m['max_delay_ms']}; {result['concurrency']} clients at saturation; "
        f"{result['image']}",
        "",
        f"{'raw layout (CPU of this process)':<36} {'images/s':>9} {'CPU ms/image':>13}",
    ]
    for r in result["raw_layouts"]:
        mark = "  <- best" if (r["instances"], r["batch"]) == (best["instances"], best["batch"]) else ""
        layout = f"{r['instances']} instance(s) x batch {r['batch']}"
        lines.append(f"{layout:<36} {r['images_per_s']:>9.1f} {r['cpu_ms_per_image']:>13.2f}{mark}")
    best_label = f"raw, best layout ({best['instances']} x batch {best['batch']})"
    lines += [
        "",
        f"interleaved, {len(result['rounds'])} rounds {'':<14} {'images/s':>9} {'CPU ms/image':>13} "
        f"{'in the model':>13} {'outside the model ms/image':>32} {'service/raw images/s':>24}",
        f"{best_label:<36} "
        f"{best['images_per_s_interleaved']:>9.1f} {best['cpu_ms_per_image_interleaved']:>13.2f}"
        "   (the images/s ratio's base)",
    ]
    own = result.get("service_layout")
    if own and (own["instances"], own["batch"]) != (best["instances"], best["batch"]):
        label = f"raw, service's layout ({own['instances']} x batch {own['batch']})"
        lines.append(f"{label:<36} "
                     f"{own['images_per_s_interleaved']:>9.1f} {own['cpu_ms_per_image_interleaved']:>13.2f}"
                     "   (the CPU difference's base)")  # fmt: skip
    for mode, s in modes.items():
        lo, hi = s["outside_ms_per_round"]
        rlo, rhi = s["ratio_per_round"]
        lines.append(
            f"{f'service, records {mode}':<36} {s['images_per_s']:>9.1f} {s['cpu_ms_per_image']:>13.2f} "
            f"{s['model_ms_per_image']:>13.2f} {s['outside_ms_per_image']:>9.2f} (rounds {lo:.2f}..{hi:.2f}) "
            f"{s['ratio']:>9.3f} ({rlo:.2f}..{rhi:.2f})" + (f"  {s['errors']} errors" if s["errors"] else "")
        )
    lines.append(
        "(in the model: the service's CPU inside the backend's call, from its aoi_backend_call_cpu_seconds_total, plus "
        "its runtime's native threads; outside = CPU - in the model, both measured in the service. The raw backend's "
        "CPU in the slices beside them gives outside = "
        + ", ".join(f"{m} {s['outside_by_subtraction_ms_per_image']:.2f}" for m, s in modes.items())
        + " ms: the model's own cost drifts between slices)"
    )
    lines += _split_lines(result, "threads_ms", "where the service's CPU goes, by thread (kernel accounting, exact)")
    profiled = next((s["profile"] for s in modes.values() if "profile" in s), None)
    if profiled:
        title = (
            f"by stage (py-spy, {profiled['seconds']} s at 100 Hz per mode; sampling: a few % per share; "
            "% = share of the CPU outside the model)"
        )
        lines += _split_lines(result, "stages_ms", title)
        top = modes.get("durable", {}).get("profile", {}).get("unplaced_top")
        if top:
            lines.append("not placed by a rule (records durable, share of samples): "
                         + ", ".join(f"{k} {v:.1%}" for k, v in top))  # fmt: skip
    elif result["profiler"] is None:
        lines.append("\nby stage: py-spy not found (pip install py-spy, the dev extra) or --profile-s 0")
    for mode, s in modes.items():
        if "profile_error" in s:
            lines.append(f"py-spy failed on records {mode}: {s['profile_error']}")
    return "\n".join(lines + _tail_lines(result))


def _split_lines(result: dict[str, Any], key: str, title: str) -> list[str]:
    modes = result["modes"]
    names = list(dict.fromkeys(k for s in modes.values() for k in s.get(key, {})))
    lines = ["", title, f"{'ms/image':<44}" + "".join(f"{f'records {m}':>18}" for m in modes)]
    for name in names:
        cells = []
        for s in modes.values():
            ms = s.get(key, {}).get(name, 0.0)
            if key != "stages_ms":
                cells.append(f"{ms:>18.2f}")
            elif name == "inference":  # holds the model: its share is not of the CPU outside it
                cells.append(f"{ms:>10.2f}       ")
            else:
                cells.append(f"{ms:>10.2f} ({ms / s['outside_ms_per_image']:>4.0%})")
        label = "inference (the backend's call, model included)" if name == "inference" and key == "stages_ms" else name
        lines.append(f"{label:<44}" + "".join(f"{c:>18}" for c in cells))
    return lines


def _tail_lines(result: dict[str, Any]) -> list[str]:
    h = result["half_saturation"]
    lines = [
        "",
        f"half saturation (records durable, open loop at {h['offered_rate']:.1f} images/s): p50 "
        f"{h['p50_ms']:.2f} ms, p99 {h['p99_ms']:.2f} ms; raw batch 1 alone {h['raw_batch1_ms_p50']:.2f} ms; "
        f"p99 / raw batch 1 = {h['p99_over_raw_b1']:.2f} (target <= 2)"
        + (f"; {h['errors']} errors" if h["errors"] else ""),
    ]
    fl = result.get("floor")
    if fl:
        lines.append(
            f"floor on this machine (per image, this run): uvicorn alone {fl['http_asgi_ms']:.2f} ms per request, "
            f"with a FastAPI route {fl['http_fastapi_ms']:.2f} (at their saturation; at the service's "
            f"{fl['paced_rate']:.0f} requests/s: {fl['http_asgi_paced_ms']:.2f} and "
            f"{fl['http_fastapi_paced_ms']:.2f}); "
            f"decode {fl['decode_ms_alone']:.2f} alone / "
            f"{fl['decode_ms_beside_model']:.2f} beside the model, letterbox into the model input "
            f"{fl['letterbox_ms_alone']:.2f} / {fl['letterbox_ms_beside_model']:.2f}: at least "
            f"{fl['floor_ms']:.2f} ms ({fl['floor_with_fastapi_ms']:.2f} with FastAPI), at the service's rate "
            f"{fl['floor_paced_ms']:.2f} ({fl['floor_paced_with_fastapi_ms']:.2f}), before batching, NMS, records and "
            "the answer"
        )
    f = result["frame"]
    if f:
        lines.append(
            f"line frame {f['size'][0]}x{f['size'][1]} ({f['tiles']} tiles, {f['frames']} frames, one "
            f"client, records durable): end to end {f['e2e_s_p50']:.3f} s vs raw {f['raw_s_for_tiles']:.3f} s "
            f"for its tiles ({f['e2e_over_raw']:.2f}x); CPU {f['cpu_ms_per_frame']:.0f} ms per frame, "
            f"outside the model {f['outside_ms_per_tile']:.3f} ms per tile"
        )
    return lines


def run(args: argparse.Namespace) -> int:
    """``aoi bench service --cpu``: see the module docstring."""
    from service.core.errors import BackendUnavailable

    checked = checked_inputs(args)
    if isinstance(checked, int):
        return checked
    bundle, data, args.inputs = checked
    # the queue bound of the services: the clients of auto for two instances until /v1/model tells; a frame's tiles
    args.clients = int(args.concurrency) if args.concurrency != "auto" else 4 * args.max_batch_size
    args.set = [*args.set, ("QUEUE_SIZE", "4096")] if args.frame else args.set
    try:
        result = asyncio.run(_measure(args, data, bundle))
    except (RuntimeError, OSError, BackendUnavailable) as exc:
        sys.stderr.write(f"aoi bench: error: {exc}\n")
        return 1
    name = args.image.name if args.image is not None else "a synthetic JPEG"
    result = {
        "bundle": str(args.bundle),
        "image": f"{name} ({args.inputs} model input(s))",
        "model_inputs_per_image": args.inputs,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "service_settings": dict(args.set),
        **result,
    }
    return report(_table(result), result, args.json)


if __name__ == "__main__":
    from aoi.cli import main

    raise SystemExit(main(["bench", "service", "--cpu", *sys.argv[1:]]))
