"""Raw CPU throughput per runtime and precision, in one table: ONNX Runtime fp32 at its best layout (two 1-thread
sessions side by side, what the service runs) against ONNX Runtime's INT8 (the bundle's ``onnx.int8_file``, same
layout) and OpenVINO fp32 / bf16 / int8 with 2 streams (static and dynamic batch shapes), each at its best batch,
with the mAP50 that export measured for each precision on the bundle's calibration split (parity.json).

Rounds are interleaved (every layout and batch once per round, then again): this VM's speed drifts 10-20 % over a run,
so only ratios measured side by side mean anything. Run with ``nice`` on a shared machine and say so.

    python -m benchmarks.bench_precision --rounds 3 --seconds 2 --json docs/cpu-precisions/raw.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.raw_backend import random_input, time_calls
from service.backends import InferenceBackend, cpu_cores, load_backend
from service.core.bundle import ModelBundle, load_bundle
from service.core.errors import BackendUnavailable

__all__ = ["Layout", "main"]

_PARITY = {"fp32": "openvino_fp32_vs_onnx_fp32", "bf16": "openvino_bf16_vs_onnx_fp32",
           "int8": "openvino_int8_vs_onnx_fp32"}  # fmt: skip


@dataclass
class Layout:
    name: str
    precision: str
    backend: InferenceBackend
    threads: int  # caller threads = instances (sessions / streams)
    rates: dict[int, list[float]]
    comparison: str = ""  # parity.json comparison holding its mAP ("": the reference, ONNX Runtime fp32)


def _layouts(bundle: ModelBundle, cache: Path, max_batch: int) -> tuple[list[Layout], list[str]]:
    from service.backends.openvino_backend import BatchShapes, OpenVinoBackend

    cores = cpu_cores()
    ort = load_backend("onnxruntime-cpu", bundle, instances=2, max_batch_size=max_batch, precision="fp32")
    out = [Layout("onnxruntime fp32, 2 sessions x 1 thread", "fp32", ort.backend, ort.instances, {})]
    skipped = []
    if bundle.onnx.int8_file is not None:
        q = load_backend("onnxruntime-cpu", bundle, instances=2, max_batch_size=max_batch, precision="int8")
        out.append(Layout("onnxruntime int8 (QDQ), 2 sessions x 1 thread", "int8", q.backend, q.instances, {},
                          "onnx_int8_vs_onnx_fp32"))  # fmt: skip
    else:
        skipped.append("onnxruntime int8: the bundle has no onnx.int8_file (aoi export --int8)")
    shape_modes: tuple[BatchShapes, ...] = ("static", "dynamic")
    for precision in ("fp32", "bf16", "int8"):
        for shapes in shape_modes:
            try:
                backend = OpenVinoBackend(
                    bundle, precision=precision, max_batch_size=max_batch, streams=2, threads=max(2, cores),
                    cache_root=cache, batch_shapes=shapes,
                )  # fmt: skip
            except BackendUnavailable as exc:
                skipped.append(f"openvino {precision}: {exc}")
                break
            out.append(Layout(f"openvino {precision}, 2 streams, {shapes} batch", precision, backend, 2, {},
                              _PARITY[precision]))  # fmt: skip
    return out, skipped


def _startup(bundle: ModelBundle, max_batch: int) -> dict[str, Any]:
    """Seconds to load the OpenVINO backend as the service does (``precision: auto``) with an empty compiled-model
    cache, then again with the cache the first load filled (a restart)."""
    import time

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as cache:
        for run in ("cold", "cached"):
            start = time.perf_counter()
            choice = load_backend("openvino", bundle, max_batch_size=max_batch, engine_cache=Path(cache))
            seconds = time.perf_counter() - start
            b = choice.backend
            out[run] = {"load_s": round(seconds, 2), "compile_s": round(float(getattr(b, "compile_s", 0)), 2),
                        "cache_hit": getattr(b, "cache_hit", None)}  # fmt: skip
            out["precision"] = b.precision
            b.close()
    return out


def _row(layout: Layout, base: float, parity: dict[str, Any]) -> dict[str, Any]:
    med = {b: float(np.median(r)) for b, r in layout.rates.items()}
    best = max(med, key=lambda b: med[b])
    comparisons = parity.get("comparisons", {})
    m = (comparisons.get(layout.comparison or _PARITY["fp32"], {})).get("map") or {}
    if not layout.comparison:  # the reference of every comparison
        m = {"candidate_map50": m.get("reference_map50")}
    return {
        "layout": layout.name,
        "precision": layout.backend.precision,
        "best_batch": best,
        "images_per_s": round(med[best], 1),
        "per_batch": {b: round(v, 1) for b, v in med.items()},
        "spread": [round(min(layout.rates[best]), 1), round(max(layout.rates[best]), 1)],
        "vs_onnxruntime": round(med[best] / base, 3),
        "map50": m.get("candidate_map50"),
        "delta_map50": m.get("delta_map50"),
        "delta_map50_95": m.get("delta_map50_95"),
        "accuracy_method": (
            parity.get("cpu_precisions", {}).get("bf16", {}).get("method") if layout.precision == "bf16" else None
        ),
    }


def _fmt(rows: list[dict[str, Any]]) -> str:
    head = f"{'layout':44} {'batch':>5} {'images/s':>9} {'min-max':>13} {'vs ORT':>7} {'mAP50':>7} {'dmAP50':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        m = f"{r['map50']:.4f}" if r["map50"] is not None else "-"
        d = f"{r['delta_map50'] * 100:+.2f}pt" if r["delta_map50"] is not None else "-"
        spread = f"{r['spread'][0]:.0f}-{r['spread'][1]:.0f}"
        lines.append(f"{r['layout']:44} {r['best_batch']:>5} {r['images_per_s']:>9.1f} {spread:>13} "
                     f"{r['vs_onnxruntime']:>6.2f}x {m:>7} {d:>8}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=Path("bundles/default"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0, help="per layout, batch and round")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    bundle = load_bundle(args.bundle)
    parity_path = args.bundle / "parity.json"
    parity = json.loads(parity_path.read_text()) if parity_path.is_file() else {}
    with tempfile.TemporaryDirectory() as cache:
        layouts, skipped = _layouts(bundle, Path(cache), max(args.batches))
        spec = bundle.input
        rng = np.random.default_rng(0)
        xs = {b: random_input(spec, b, rng) for b in args.batches}
        for lay in layouts:
            lay.backend.warmup()
        for rnd in range(args.rounds):
            for lay in layouts:
                for b in args.batches:
                    calls = time_calls(lay.backend, xs[b], args.seconds, lay.threads)
                    lay.rates.setdefault(b, []).append(calls.images_per_s)
            print(f"round {rnd + 1}/{args.rounds} done", flush=True)
        base = max(float(np.median(r)) for r in layouts[0].rates.values())
        rows = [_row(lay, base, parity) for lay in layouts]
        for lay in layouts:
            lay.backend.close()
    startup = _startup(bundle, max(args.batches))
    print(_fmt(rows))
    for s in skipped:
        print(f"not run: {s}")
    print(f"startup, openvino {startup['precision']}, batch sizes 1..{max(args.batches)}: "
          f"cold {startup['cold']['load_s']} s (cache hit {startup['cold']['cache_hit']}), "
          f"restart {startup['cached']['load_s']} s (cache hit {startup['cached']['cache_hit']})")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"bundle": f"{bundle.name} {bundle.version}", "rounds": args.rounds, "seconds": args.seconds,
                "cores": cpu_cores(), "input": f"{spec.width}x{spec.height}", "not_run": skipped}  # fmt: skip
        args.json.write_text(json.dumps({**meta, "rows": rows, "startup": startup}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
