"""Is ONNX Runtime's own INT8 (static QDQ quantisation) faster than its fp32 for a bundle's model on this CPU?

Quantises ``model.onnx`` with ``onnxruntime.quantization.quantize_static`` (QDQ format, per-channel int8 weights,
uint8 activations: the U8S8 form ONNX Runtime's x86 kernels are built for), calibrated on real images preprocessed as
the service does, then times fp32 and QDQ INT8 at the service's CPU layout (two 1-thread sessions side by side) in
interleaved rounds. A measurement to decide with, not a serving path: docs/service.md records the answer.

``--fp32`` chooses what stays in fp32: ``none`` (everything quantised), ``decode`` (the box decode after the head's
first Concat: the output mixes pixel coordinates and scores in one tensor, which one uint8 scale cannot hold), or
``mixed`` (the decode, the Detect head, the stem and the last neck blocks: what OpenVINO's accuracy-aware INT8 keeps
too). ``--out DIR`` keeps the quantised bundle, for ``aoi val --model DIR``.

    python -m benchmarks.bench_ort_int8 --bundle bundles/default --data ../shared/datasets/NEU-DET --json out.json
    python -m benchmarks.bench_ort_int8 --data NEU-DET --split train --images 300 --fp32 mixed --out /tmp/qdq
    aoi val --model /tmp/qdq --data NEU-DET            # its accuracy, against aoi val --model bundles/default
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from benchmarks.raw_backend import time_calls
from export.cpu_precisions import calibration_inputs
from export.samples import SampleSet
from service.backends.ort_backend import OrtBackend
from service.bundle import ModelBundle, load_bundle, write_bundle

__all__ = ["main", "quantize_qdq"]


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader``: one preprocessed image per call."""

    def __init__(self, inputs: Iterator[npt.NDArray[np.float32]], name: str) -> None:
        self._it, self._name = inputs, name

    def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
        x = next(self._it, None)
        return None if x is None else {self._name: x}


# Node-name prefixes kept in fp32 by ``--fp32 mixed`` (the YOLO11 export's names): Detect head, stem, last neck blocks.
MIXED_FP32_PREFIXES = ("/detector/model.23/", "/detector/model.0/", "/detector/model.1/", "/detector/model.20/",
                       "/detector/model.22/")  # fmt: skip


def fp32_nodes(model_path: Path, keep: str) -> list[str]:
    """Names of the nodes ``--fp32 keep`` leaves unquantised: none, the decode (every node outside the detector and
    the head's Concats), or that plus :data:`MIXED_FP32_PREFIXES`."""
    import onnx

    if keep == "none":
        return []
    names = [n.name for n in onnx.load(str(model_path)).graph.node]
    decode = [n for n in names if not n.startswith("/detector/") or n.startswith("/detector/model.23/Concat")]
    if keep == "decode":
        return decode
    return sorted(set(decode) | {n for n in names if n.startswith(MIXED_FP32_PREFIXES)})


def quantize_qdq(bundle: ModelBundle, samples: SampleSet, out: Path, images: int, keep_fp32: str = "none") -> Path:
    """A copy of ``bundle`` in ``out`` whose ``model.onnx`` is the static QDQ INT8 model (``keep_fp32``: see
    :func:`fp32_nodes`)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    out.mkdir(parents=True, exist_ok=True)
    quantize_static(
        str(bundle.path(bundle.onnx.file)),
        str(out / "model.onnx"),
        _Reader(calibration_inputs(samples, images), bundle.input.name),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=fp32_nodes(bundle.path(bundle.onnx.file), keep_fp32),
    )
    write_bundle(bundle.model_copy(update={"name": bundle.name + ".ort-qdq-int8", "files": {}, "openvino": None}), out)
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
    p.add_argument("--fp32", choices=("none", "decode", "mixed"), default="none", help="what stays fp32 (see above)")
    p.add_argument("--out", type=Path, default=None, help="keep the quantised bundle here (for aoi val)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    bundle = load_bundle(args.bundle)
    samples = SampleSet.from_split(args.data, args.split, bundle.input)
    with tempfile.TemporaryDirectory() as tmp:
        qdq = load_bundle(quantize_qdq(bundle, samples, args.out or Path(tmp) / "qdq", args.images, args.fp32))
        runs = {name: OrtBackend(b, sessions=2, intra_op_threads=1, max_batch_size=max(args.batches))
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
