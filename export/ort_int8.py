"""ONNX Runtime's own INT8 for CPU: static QDQ quantisation of the bundle's ONNX (``model.int8.onnx``), with the
layers that break accuracy kept in fp32.

``aoi export --int8`` writes it beside OpenVINO's INT8 IR; both are measured against the same fp32 reference and
ranked by speed (docs/service.md, "CPU precisions"): on the AVX2 VM this one was the faster INT8, on the AVX-512
BF16 VM it is second to OpenVINO BF16 and what a CPU without BF16 serves.

Fully quantised, a YOLO head scores mAP50 0.000 (its output tensor holds pixel coordinates and scores together,
which one uint8 scale cannot carry); the fp32 scope is chosen here by the graph's shape, not by names:

- the **decode**: every node from the Concats that join a level's raw box and class convolutions to the output;
- the **level branches**: every node feeding exactly one of those Concats (a level's own box and class branches and
  the last neck blocks no other level reads);
- the **stem**: every node before the third convolution (the input layers, whose error every later layer inherits).

Measured on the default bundle (calibrated on 300 NEU-DET train images, scored on the 360 val images): mAP50 0.678
vs 0.680 fp32 at 1.27x ONNX Runtime fp32 (``benchmarks/bench_ort_int8.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from export.cpu_precisions import calibration_inputs
from export.samples import SampleSet

__all__ = ["ORT_INT8_FILE", "Fp32Scope", "OrtInt8Attempt", "fp32_scope", "quantize_ort_int8"]

ORT_INT8_FILE = "model.int8.onnx"
STEM_CONVS = 2


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader``: one preprocessed image per call."""

    def __init__(self, inputs: Iterator[npt.NDArray[np.float32]], name: str) -> None:
        self._it, self._name = inputs, name

    def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
        x = next(self._it, None)
        return None if x is None else {self._name: x}


@dataclass(frozen=True)
class Fp32Scope:
    decode: list[str]  # decode: the head Concats and everything after them
    branches: list[str]  # nodes feeding exactly one head Concat
    stem: list[str]  # nodes before the (STEM_CONVS + 1)-th convolution

    @property
    def nodes(self) -> list[str]:
        return sorted(set(self.decode) | set(self.branches) | set(self.stem))


def _reach(starts: list[int], step: Callable[[int], list[int]]) -> set[int]:
    """``starts`` and every node reached from them by ``step`` (a node's consumers, or its producers)."""
    seen: set[int] = set()
    stack = list(starts)
    while stack:
        if (i := stack.pop()) not in seen:
            seen.add(i)
            stack += step(i)
    return seen


def fp32_scope(model: Any, stem: int = STEM_CONVS) -> Fp32Scope:
    """The nodes of ``model`` (an ``onnx.ModelProto``, nodes in topological order as ONNX requires) that stay fp32;
    see the module docstring. A graph without such head Concats keeps only the stem."""
    nodes = list(model.graph.node)
    names = [n.name or f"#{i}" for i, n in enumerate(nodes)]
    producer = {t: i for i, n in enumerate(nodes) for t in n.output}

    def inputs_of(i: int) -> list[int]:
        return [producer[t] for t in nodes[i].input if t in producer]

    def is_conv(t: str) -> bool:
        return t in producer and nodes[producer[t]].op_type == "Conv"

    heads = [i for i, n in enumerate(nodes)
             if n.op_type == "Concat" and len(n.input) > 1 and all(map(is_conv, n.input))]  # fmt: skip
    consumers: dict[int, list[int]] = {i: [] for i in range(len(nodes))}
    for i in range(len(nodes)):
        for j in inputs_of(i):
            consumers[j].append(i)
    decode = _reach(heads, consumers.__getitem__)
    feeds = [_reach(inputs_of(h), inputs_of) for h in heads]
    branches = {i for i in range(len(nodes)) if sum(i in f for f in feeds) == 1} - decode
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    first_kept = convs[stem] if len(convs) > stem else len(nodes)
    return Fp32Scope(
        decode=[names[i] for i in sorted(decode)],
        branches=[names[i] for i in sorted(branches)],
        stem=[names[i] for i in range(first_kept)],
    )


@dataclass(frozen=True)
class OrtInt8Attempt:
    path: Path
    fp32: list[str]  # node names left unquantised
    note: str


def quantize_ort_int8(
    onnx_path: Path, out: Path, samples: SampleSet, input_name: str, *, subset: int, fp32: list[str] | None = None
) -> OrtInt8Attempt:
    """Static QDQ INT8 of ``onnx_path`` at ``out``: per-channel int8 weights, uint8 activations (the U8S8 form
    ONNX Runtime's x86 kernels are built for), MinMax ranges from ``subset`` images of ``samples`` preprocessed as
    the service does, :func:`fp32_scope` unquantised (``fp32``: these node names instead, for measurements).
    Inputs and outputs stay float32 with the same names."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    graph = onnx.load(str(onnx_path), load_external_data=False)
    scope = fp32_scope(graph)
    if fp32 is not None:
        scope = Fp32Scope(decode=[], branches=[], stem=fp32)
    n = min(subset, len(samples))
    quantize_static(
        str(onnx_path),
        str(out),
        _Reader(calibration_inputs(samples, n), input_name),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=scope.nodes,
    )
    total = len(graph.graph.node)
    note = (f"onnxruntime {onnxruntime.__version__} quantize_static (QDQ, per-channel S8 weights, U8 activations, "
            f"MinMax), {n} images; fp32: {len(scope.nodes)} of {total} nodes (decode {len(scope.decode)}, level "
            f"branches {len(scope.branches)}, stem {len(scope.stem)})")  # fmt: skip
    return OrtInt8Attempt(out, scope.nodes, note)
