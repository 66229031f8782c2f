"""The CPU precisions of a bundle for the OpenVINO backend: fp32, BF16 (no file, only a measured accuracy) and INT8
(NNCF post-training quantisation of the ONNX, written as ``model.int8.xml/.bin``).

Each runs over the calibration split through the same evaluation loop as every other parity check and is compared
with ONNX Runtime fp32; BF16 and INT8 must keep mAP50 within their bound (:data:`BF16_MAP50_DROP_MAX`,
:data:`INT8_MAP50_DROP_MAX`). INT8 that breaks its bound is quantised once more with the mixed preset and the
decode subgraph, the head and the stem kept in fp32 (an ignored scope) before the export gives up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from export.parity import Tolerance
from export.samples import SampleSet
from service.core.preprocess import letterbox, to_input

__all__ = [
    "BF16_MAP50_DROP_MAX",
    "INT8_FILE",
    "INT8_MAP50_DROP_MAX",
    "INT8_WEIGHTS",
    "Int8Attempt",
    "OvRunner",
    "bf16_runner",
    "calibration_inputs",
    "cpu_tolerance",
    "decode_subgraph",
    "fp32_convolutions",
    "quantize_int8",
    "rank_by_speed",
]

logger = logging.getLogger(__name__)
INT8_FILE = "model.int8.xml"
INT8_WEIGHTS = INT8_FILE.removesuffix(".xml") + ".bin"  # the IR's weights, next to it
# Bounds of the issue (15): the drop of mAP50 against ONNX Runtime fp32 on the calibration split, in mAP units
# (0.005 = 0.5 pt). A gain is no loss of accuracy and passes; mAP50-95 is reported next to it.
BF16_MAP50_DROP_MAX = 0.005
INT8_MAP50_DROP_MAX = 0.010
CALIBRATION_IMAGES = 300  # NNCF's default subset size


def cpu_tolerance(map50_drop_max: float) -> Tolerance:
    """Reduced precision moves boxes and scores; only accuracy is enforced (the mAP50 drop)."""
    return Tolerance(box_max_abs=None, score_max_abs=None, anchor_iou_min=None, match_iou=0.9, min_match_rate=None,
                     map_delta_max=None, map50_drop_max=map50_drop_max)  # fmt: skip


class OvRunner:
    """An OpenVINO CPU compiled model with an explicit precision hint (dynamic batch), as a parity runner."""

    def __init__(self, model: Any, *, hint: str, label: str) -> None:
        import openvino as ov

        core = ov.Core()
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
        self.name = f"openvino {ov.get_version().split('-')[0]} {label}"
        self.hint = hint

    def __call__(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return np.array(self.compiled(x)[0], dtype=np.float32)


def _has_bf16() -> bool:
    import openvino as ov

    return "BF16" in [str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def bf16_runner(onnx_path: Path) -> tuple[OvRunner, str]:
    """BF16 as the service runs it, and how it was measured.

    On a CPU with BF16 (AVX-512 BF16 / AMX): the ONNX with the bf16 hint, OpenVINO's own BF16 kernels. Elsewhere the
    hint would be ignored, so BF16 is emulated: every Convolution and MatMul input (activations and weights) is
    rounded to bfloat16 and the product accumulated in fp32, which is what the BF16 dot-product instructions do.
    The emulation does not round between element-wise layers, so it is an estimate, and parity.json says so.
    """
    import openvino as ov

    if _has_bf16():
        return OvRunner(str(onnx_path), hint="bf16", label="bf16"), "openvino bf16 kernels (this CPU has BF16)"
    import openvino.opset13 as ops

    model = ov.Core().read_model(str(onnx_path))
    for node in model.get_ordered_ops():
        if node.get_type_name() in ("Convolution", "GroupConvolution", "MatMul"):
            for port in node.inputs():
                src = port.get_source_output()
                port.replace_source_output(ops.convert(ops.convert(src, ov.Type.bf16), ov.Type.f32).output(0))
    method = ("emulated: this CPU has no BF16, so Convolution/MatMul inputs were rounded to bfloat16 with fp32 "
              "accumulation (f32 hint); an estimate of OpenVINO BF16")  # fmt: skip
    return OvRunner(model, hint="f32", label="bf16 (emulated)"), method


def calibration_inputs(samples: SampleSet, count: int = CALIBRATION_IMAGES) -> Iterator[npt.NDArray[np.float32]]:
    """``(1, 3, H, W)`` float32 inputs of the first ``count`` images, letterboxed and normalised as the service does."""
    spec = samples.spec
    for i in range(min(count, len(samples))):
        boxed, _ = letterbox(samples.image(i), (spec.height, spec.width), spec.pad_value)
        yield to_input([boxed], spec)


def _is_conv_output(node: Any) -> bool:
    """A convolution's raw output: the Convolution itself, or the bias Add right after it (OpenVINO splits them)."""
    if node.get_type_name() in ("Convolution", "GroupConvolution"):
        return True
    return node.get_type_name() == "Add" and any(
        p.get_source_output().get_node().get_type_name() in ("Convolution", "GroupConvolution") for p in node.inputs()
    )


def decode_subgraph(model: Any) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of a YOLO head's decode subgraph: from each Concat that joins raw prediction convolutions
    (a level's box and class outputs, no activation between) to the model's outputs: DFL softmax, anchor arithmetic,
    sigmoid. Box regression values and class logits share those tensors with very different ranges, and the
    anchor arithmetic turns a small quantisation step into pixels, so these layers stay in fp32 (the subgraph
    Ultralytics and the OpenVINO YOLO notebooks exclude too)."""
    starts = [
        n.get_friendly_name()
        for n in model.get_ordered_ops()
        if n.get_type_name() == "Concat"
        and n.get_input_size() > 1
        and all(_is_conv_output(p.get_source_output().get_node()) for p in n.inputs())
    ]
    ends = [r.input(0).get_source_output().get_node().get_friendly_name() for r in model.get_results()]
    return starts, ends


def _ancestors(node: Any) -> set[str]:
    seen: set[str] = set()
    stack = [node]
    while stack:
        for port in stack.pop().inputs():
            src = port.get_source_output().get_node()
            if (name := src.get_friendly_name()) not in seen:
                seen.add(name)
                stack.append(src)
    return seen


def fp32_convolutions(model: Any, starts: list[str], stem: int = 2) -> list[str]:
    """Convolutions the INT8 fallback keeps in fp32: the first ``stem`` (the input layers, whose error every later
    layer inherits) and the head's, i.e. those feeding exactly one of the decode ``starts`` (a level's own box and
    class branches, and the last neck block of a level no other level reads)."""
    ops = {n.get_friendly_name(): n for n in model.get_ordered_ops()}
    convs = [k for k, n in ops.items() if n.get_type_name() in ("Convolution", "GroupConvolution")]
    feeds = [_ancestors(ops[s]) for s in starts if s in ops]
    head = [c for c in convs if sum(c in a for a in feeds) == 1]
    return list(dict.fromkeys(convs[:stem] + head))


@dataclass(frozen=True)
class Int8Attempt:
    xml: Path
    ignored: list[str]  # decode-subgraph inputs and convolutions kept in fp32 (empty: everything quantised)
    note: str


def quantize_int8(
    onnx_path: Path,
    out_xml: Path,
    samples: SampleSet,
    *,
    keep_head_fp32: bool = False,
    subset: int = CALIBRATION_IMAGES,
) -> Int8Attempt:
    """NNCF post-training quantisation of the ONNX read by OpenVINO, calibrated on ``subset`` images of ``samples``;
    saves the IR (uncompressed fp32 constants) at ``out_xml`` (+ ``.bin``).

    Plain: NNCF's default (performance preset: symmetric int8 weights and activations). ``keep_head_fp32``, the
    fallback: the mixed preset (asymmetric activations: SiLU outputs are almost all positive, so a symmetric range
    wastes half its codes), the head's :func:`decode_subgraph` and :func:`fp32_convolutions` left in fp32. Measured
    on the default bundle (docs/service.md): plain -4.9 pt mAP50, mixed + decode -2.4, + head -2.2, + stem -0.8.
    """
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(onnx_path))
    n = min(subset, len(samples))
    scope, preset, starts, convs = None, None, list[str](), list[str]()
    if keep_head_fp32:
        starts, ends = decode_subgraph(model)
        convs = fp32_convolutions(model, starts)
        subgraphs = [nncf.Subgraph(inputs=starts, outputs=ends)] if starts else []
        scope = nncf.IgnoredScope(names=convs, subgraphs=subgraphs)
        preset = nncf.QuantizationPreset.MIXED
    quantized = nncf.quantize(model, nncf.Dataset(list(calibration_inputs(samples, n))), subset_size=n,
                              preset=preset, ignored_scope=scope)  # fmt: skip
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    note = f"nncf {nncf.__version__} quantize, {'mixed' if keep_head_fp32 else 'default'} preset, {n} images"
    if keep_head_fp32:
        note += f"; fp32: the decode after {len(starts)} head concat(s) and {len(convs)} convolutions (stem and head)"
    return Int8Attempt(out_xml, starts + convs, note)


def rank_by_speed(
    runners: dict[str, Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]],
    x: npt.NDArray[np.float32],
    *,
    rounds: int = 3,
    seconds: float = 0.5,
) -> dict[str, float]:
    """Images/s of each runner on ``x``, measured in interleaved rounds (the median of each), fastest first."""
    rates: dict[str, list[float]] = {k: [] for k in runners}
    for run in runners.values():
        run(x)
    for _ in range(rounds):
        for name, run in runners.items():
            n, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds or n < 2:
                run(x)
                n += x.shape[0]
            rates[name].append(n / elapsed)
    medians = {k: float(np.median(v)) for k, v in rates.items()}
    return dict(sorted(medians.items(), key=lambda kv: -kv[1]))
