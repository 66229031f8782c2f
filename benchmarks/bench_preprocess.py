"""Preprocessing inside the graph: what it saves on the service side, and what it costs the backend.

    python -m benchmarks.bench_preprocess --bundle bundles/default --u8-bundle bundles/default-u8 \\
        [--image /path/to/200x200.jpg] [--rounds 5] [--seconds 2] [--skip-backend]

1. ``fill_input`` of one decoded 200x200 JPEG window into a batch row: float32 NCHW (cast, scale, per-channel
   writes) vs uint8 NHWC (the letterboxed RGB pixels only), one thread, CPU time (``time.thread_time``) and wall
   time per call, interleaved rounds (float, uint8, float, ...), the median of each round's median.
2. The raw backend time per image of the float graph vs the uint8 graph of the same bundle (``--u8-bundle``: the
   bundle converted by ``aoi export --from-bundle --uint8-input``), fed the same letterboxed images: ONNX Runtime
   CPU fp32 and int8 (when the bundle has it) and OpenVINO fp32 (and bf16 where the CPU has it), batch 1 and the
   largest served batch, one call at a time on all cores, process CPU ms and wall ms per image, interleaved rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from service.core.backend import InferenceBackend
from service.core.bundle import ModelBundle, load_bundle
from service.core.errors import BackendUnavailable
from service.core.preprocess import Frame, decode_frame, fill_input, new_batch, to_input

__all__ = ["main"]


def _jpeg(path: Path | None) -> bytes:
    if path is not None:
        return path.read_bytes()
    import cv2

    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(128, 30, (200, 200)), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return bytes(buf)


def _time_fill(frame: Frame, row: npt.NDArray[Any], bundle: ModelBundle, n: int) -> tuple[float, float]:
    """Median CPU and wall microseconds of ``n`` fills of the whole frame into ``row``."""
    window = (0, 0, frame.width, frame.height)
    cpu, wall = [], []
    for _ in range(n):
        c0, w0 = time.thread_time(), time.perf_counter()
        fill_input(row, frame, window, bundle.input)
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu) * 1e6, statistics.median(wall) * 1e6


def bench_fill(float_b: ModelBundle, u8_b: ModelBundle, data: bytes, rounds: int) -> dict[str, Any]:
    import cv2

    cv2.setNumThreads(1)
    frame = decode_frame(data, max_pixels=40_000_000)
    rows = {
        "float32 NCHW": (float_b, new_batch(float_b.input, 1)[0]),
        "uint8 NHWC": (u8_b, new_batch(u8_b.input, 1)[0]),
    }
    per: dict[str, list[tuple[float, float]]] = {k: [] for k in rows}
    for _ in range(rounds):
        for name, (bundle, row) in rows.items():
            _time_fill(frame, row, bundle, 50)  # warm
            per[name].append(_time_fill(frame, row, bundle, 2000))
    out = {k: {"cpu_us": statistics.median(c for c, _ in v), "wall_us": statistics.median(w for _, w in v),
               "rounds_cpu_us": [round(c, 2) for c, _ in v]} for k, v in per.items()}  # fmt: skip
    out["frame"] = {"width": frame.width, "height": frame.height, "order": frame.order}
    return out


def _backends(bundle: ModelBundle, max_batch: int) -> dict[str, Callable[[], InferenceBackend]]:
    from service.backends import cpu_cores
    from service.backends.openvino_backend import OpenVinoBackend, cpu_capabilities, openvino_unavailable_reason
    from service.backends.ort_backend import OrtBackend

    n = cpu_cores()  # one call at a time on every core, as the export's speed ranking times them

    def ort(precision: Literal["fp32", "int8"]) -> Callable[[], InferenceBackend]:
        return lambda: OrtBackend(bundle, max_batch_size=max_batch, precision=precision, intra_op_threads=n)

    def openvino(precision: str) -> Callable[[], InferenceBackend]:
        return lambda: OpenVinoBackend(bundle, precision=precision, max_batch_size=max_batch, threads=n,
                                       cache_root=None)  # fmt: skip

    makers = {"onnxruntime fp32": ort("fp32")}
    if bundle.onnx.int8_file is not None:
        makers["onnxruntime int8"] = ort("int8")
    if openvino_unavailable_reason() is None:
        import openvino as ov

        makers["openvino fp32"] = openvino("fp32")
        if "BF16" in cpu_capabilities(ov.Core()):
            makers["openvino bf16"] = openvino("bf16")
    return makers


def _per_image(backend: InferenceBackend, x: npt.NDArray[Any], seconds: float) -> tuple[float, float]:
    """Process CPU ms and wall ms per image of back-to-back calls on ``x`` for about ``seconds``."""
    backend.infer(x)
    calls, c0, w0 = 0, time.process_time(), time.perf_counter()
    while calls < 3 or time.perf_counter() - w0 < seconds:
        backend.infer(x)
        calls += 1
    images = calls * x.shape[0]
    return (time.process_time() - c0) / images * 1e3, (time.perf_counter() - w0) / images * 1e3


def bench_backends(float_b: ModelBundle, u8_b: ModelBundle, rounds: int, seconds: float) -> dict[str, Any]:
    from export.samples import synthetic_images
    from service.core.preprocess import letterbox

    results: dict[str, Any] = {}
    max_batch = min(8, float_b.onnx.max_batch)
    size = (float_b.input.height, float_b.input.width)
    boxed = [letterbox(im, size, float_b.input.pad_value)[0] for im in synthetic_images(max_batch)]
    for name, make_float in _backends(float_b, max_batch).items():
        try:
            pair = {"float": make_float(), "uint8": _backends(u8_b, max_batch)[name]()}
        except BackendUnavailable as exc:
            results[name] = {"skipped": str(exc)}
            continue
        for b in sorted({1, max_batch}):
            xs = {"float": to_input(boxed[:b], float_b.input), "uint8": to_input(boxed[:b], u8_b.input)}
            per: dict[str, list[tuple[float, float]]] = {k: [] for k in pair}
            for _ in range(rounds):
                for k, backend in pair.items():
                    per[k].append(_per_image(backend, xs[k], seconds))
            results[f"{name} batch {b}"] = {
                k: {"cpu_ms_per_image": statistics.median(c for c, _ in v), "wall_ms_per_image":
                    statistics.median(w for _, w in v)} for k, v in per.items()}  # fmt: skip
        for backend in pair.values():
            backend.close()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=Path("bundles/default"), help="the float bundle")
    p.add_argument("--u8-bundle", type=Path, required=True, help="the same bundle converted with --uint8-input")
    p.add_argument("--image", type=Path, default=None, help="a 200x200 JPEG (default: a synthetic grey one)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0, help="per backend, batch and round")
    p.add_argument("--skip-backend", action="store_true", help="only the preprocessing micro-benchmark")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    float_b, u8_b = load_bundle(args.bundle), load_bundle(args.u8_bundle)
    if float_b.input.pixels_in_graph or not u8_b.input.pixels_in_graph:
        p.error("--bundle must take float NCHW and --u8-bundle uint8 NHWC")
    report: dict[str, Any] = {"fill_input": bench_fill(float_b, u8_b, _jpeg(args.image), args.rounds)}
    if not args.skip_backend:
        report["backend"] = bench_backends(float_b, u8_b, args.rounds, args.seconds)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
