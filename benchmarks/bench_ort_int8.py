"""ONNX Runtime's own INT8 (static QDQ, the model ``aoi export --int8`` writes as ``onnx.int8_file``) against its
fp32 for a bundle's model on this CPU, with a choice of what stays fp32, for measuring what the export's scope buys.

Quantises ``model.onnx`` with :func:`export.ort_int8.quantize_ort_int8` (QDQ, per-channel int8 weights, uint8
activations), calibrated on real images preprocessed as the service does, then times fp32 and QDQ INT8 at the
service's CPU layout (two 1-thread sessions side by side) in interleaved rounds.

``--fp32`` chooses what stays in fp32: ``none`` (everything quantised: mAP50 0.000 on NEU-DET, the output mixes
pixel coordinates and scores in one tensor, which one uint8 scale cannot hold), ``decode`` (the head's Concats and
everything after them: 0.590), or ``scope`` (the export's: decode, level branches, stem: 0.678 vs 0.680 fp32).
``--out DIR`` keeps the quantised bundle, for ``aoi val --model DIR``.

    python -m benchmarks.bench_ort_int8 --bundle bundles/default --data ../shared/datasets/NEU-DET --json out.json
    python -m benchmarks.bench_ort_int8 --data NEU-DET --split train --images 300 --fp32 scope --out runs/qdq
    aoi val --model runs/qdq --data NEU-DET            # its accuracy, against aoi val --model bundles/default
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.raw_backend import time_calls
from export.cpu_precisions import calibration_inputs
from export.ort_int8 import fp32_scope, quantize_ort_int8
from export.samples import SampleSet
from service.backends.ort_backend import OrtBackend
from service.core.bundle import ModelBundle, load_bundle, write_bundle

__all__ = ["main", "quantize_qdq"]


def fp32_nodes(model_path: Path, keep: str) -> list[str]:
    """Names of the nodes ``--fp32 keep`` leaves unquantised: none, the decode (the head's Concats and every node
    after them), or the export's whole :func:`~export.ort_int8.fp32_scope` (decode, level branches, stem)."""
    import onnx

    if keep == "none":
        return []
    scope = fp32_scope(onnx.load(str(model_path)))
    return scope.decode if keep == "decode" else scope.nodes


def quantize_qdq(bundle: ModelBundle, samples: SampleSet, out: Path, images: int, keep_fp32: str = "scope") -> Path:
    """A copy of ``bundle`` in ``out`` whose ``model.onnx`` is the static QDQ INT8 model of ``aoi export --int8``
    (``keep_fp32``: see :func:`fp32_nodes`), for ``aoi val --model out``."""
    out.mkdir(parents=True, exist_ok=True)
    src = bundle.path(bundle.onnx.file)
    quantize_ort_int8(src, out / "model.onnx", samples, bundle.input.name, subset=images,
                      fp32=fp32_nodes(src, keep_fp32))  # fmt: skip
    onnx = bundle.onnx.model_copy(update={"int8_file": None, "cpu_precisions": ["fp32"], "fp16_file": None})
    write_bundle(bundle.model_copy(update={"name": bundle.name + ".ort-qdq-int8", "files": {}, "openvino": None,
                                           "onnx": onnx}), out)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=Path("bundles/default"))
    p.add_argument("--data", type=Path, required=True, help="calibration data (VOC folder), split --split")
    p.add_argument("--split", default="val")
    p.add_argument("--images", type=int, default=100, help="calibration images")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--fp32", choices=("none", "decode", "scope"), default="scope", help="what stays fp32 (see above)")
    p.add_argument("--out", type=Path, default=None, help="keep the quantised bundle here (for aoi val)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    bundle = load_bundle(args.bundle)
    samples = SampleSet.from_split(args.data, args.split, bundle.input)
    with tempfile.TemporaryDirectory() as tmp:
        qdq = load_bundle(quantize_qdq(bundle, samples, args.out or Path(tmp) / "qdq", args.images, args.fp32))
        runs = {name: OrtBackend(b, sessions=2, intra_op_threads=1, max_batch_size=max(args.batches), precision="fp32")
                for name, b in (("fp32", bundle), ("qdq-int8", qdq))}  # fmt: skip
        x0 = next(calibration_inputs(samples, 1))
        xs = {b: np.repeat(x0, b, axis=0) for b in args.batches}
        diff = float(np.abs(runs["fp32"].infer(xs[1]) - runs["qdq-int8"].infer(xs[1]))[:, 4:].max())
        rates: dict[str, dict[int, list[float]]] = {n: {b: [] for b in args.batches} for n in runs}
        for _ in range(args.rounds):
            for name, backend in runs.items():
                for b in args.batches:
                    rates[name][b].append(time_calls(backend, xs[b], args.seconds, 2).images_per_s)
    med = {n: {b: float(np.median(v)) for b, v in r.items()} for n, r in rates.items()}
    best = {n: max(m.values()) for n, m in med.items()}
    print(f"{'ONNX Runtime, 2 sessions x 1 thread':36} " + " ".join(f"{'batch ' + str(b):>10}" for b in args.batches))
    for n, m in med.items():
        print(f"{n:36} " + " ".join(f"{m[b]:>10.1f}" for b in args.batches))
    ratio = best["qdq-int8"] / best["fp32"]
    print(f"QDQ INT8 / fp32 at the best batch: {ratio:.2f}x (score max |diff| on one image {diff:.3g})")
    if args.json:
        result: dict[str, Any] = {"bundle": f"{bundle.name} {bundle.version}", "images_per_s": med,
                                  "best_ratio_int8_vs_fp32": round(ratio, 3), "score_max_abs_diff_one_image": diff,
                                  "calibration_images": args.images, "rounds": args.rounds,
                                  "fp32": args.fp32}  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
