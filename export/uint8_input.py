"""``aoi export --from-bundle DIR --uint8-input``: the input normalisation moved into the graph.

Each ONNX model of the bundle (fp32, and its FP16 and INT8 variants) gets a uint8 NHWC input of the same name, whose
first nodes compute what the service computed in numpy (``service.core.preprocess``): Transpose to NCHW, Cast to
float32, Mul by the float32 ``scale``, then Sub ``mean`` and Div ``std`` when they are not 0 and 1, into the tensor
that was the input. Elementwise float32 in the same order as numpy, so the float input the network sees is the same
bit for bit; the service then only letterboxes pixels (no float conversion per request).

The surgery uses the ``onnx`` helper API only, so it works on any exported ``model.onnx``. The converted bundle is
a new bundle (schema version 2, a new version, every file hashed), staged next to ``--out`` and checked before it
replaces anything: each converted model against its float original on ONNX Runtime, recorded in ``parity.json``
(``uint8_input_vs_float_input:<file>``). An OpenVINO INT8 IR (``model.int8.xml``) is not ONNX and cannot be
converted here: such a bundle is refused. A TensorRT engine built for the float input is left out (the service
builds one from the converted ``model.onnx`` on its GPU).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.parity import raw_diff
from export.pipeline import ExportError, ExportResult
from export.report import Progress
from export.samples import synthetic_images
from service.core.bundle import BUNDLE_FILE, BundleError, InputSpec, ModelBundle, load_bundle, write_bundle
from service.core.preprocess import letterbox, to_input

__all__ = ["UINT8_TOLERANCE", "Uint8InputOptions", "run_uint8_input", "uint8_input_graph", "uint8_input_spec"]

_PREFIX = "aoi_pixels"
# Converted vs float graph on the same images, raw outputs (export fails beyond): the graph computes the same float
# input, so ONNX Runtime answers the same outputs; the bound only leaves room for a runtime that folds the scale into
# the first convolution (float rounding, ~1e-6 relative).
UINT8_TOLERANCE = {"box_max_abs": 1e-3, "score_max_abs": 1e-5}
PARITY_IMAGES = 8
COMPARISON = "uint8_input_vs_float_input"  # parity.json comparison per converted model: <COMPARISON>:<file>


def uint8_input_spec(spec: InputSpec) -> InputSpec:
    """The bundle input of the converted model: the same letterbox and normalisation, uint8 NHWC."""
    return spec.model_copy(update={"layout": "NHWC", "dtype": "uint8"})


def _check_input(graph: onnx.GraphProto, spec: InputSpec) -> tuple[int, str | int | None]:
    """Index of the float input ``spec.name`` and its batch dimension (name or size)."""
    names = [v.name for v in graph.input]
    if spec.name not in names:
        raise ValueError(f"the model has no input {spec.name!r} (bundle.json input.name); its inputs are {names}")
    idx = names.index(spec.name)
    tensor = graph.input[idx].type.tensor_type
    if tensor.elem_type != TensorProto.FLOAT:
        kind = TensorProto.DataType.Name(tensor.elem_type)
        raise ValueError(f"input {spec.name!r} is {kind}, not FLOAT: only a float32 NCHW input can be converted")
    dims = list(tensor.shape.dim)
    fixed = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    want = (3, spec.height, spec.width)
    if len(dims) != 4 or any(v is not None and v != w for v, w in zip(fixed[1:], want, strict=True)):
        raise ValueError(f"input {spec.name!r} has shape {fixed}, bundle.json says [B, 3, {spec.height}, {spec.width}]")
    if any(spec.name == o.name for o in graph.output):
        raise ValueError(f"input {spec.name!r} is also a graph output")
    batch = dims[0].dim_param or (dims[0].dim_value if dims[0].HasField("dim_value") else None)
    return idx, batch


def _normalise_nodes(spec: InputSpec, into: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """uint8 NHWC ``spec.name`` -> float32 NCHW ``into``, as ``service.core.preprocess._normalise`` computes it."""
    p = _PREFIX
    centred = any(spec.mean) or any(s != 1.0 for s in spec.std)
    scaled = f"{p}_scaled" if centred else into
    nodes = [
        helper.make_node("Transpose", [spec.name], [f"{p}_u8_nchw"], perm=[0, 3, 1, 2], name=f"{p}_transpose"),
        helper.make_node("Cast", [f"{p}_u8_nchw"], [f"{p}_f32"], to=TensorProto.FLOAT, name=f"{p}_cast"),
        helper.make_node("Mul", [f"{p}_f32", f"{p}_scale"], [scaled], name=f"{p}_mul"),
    ]
    inits = [numpy_helper.from_array(np.array(spec.scale, np.float32), f"{p}_scale")]
    if centred:
        nodes += [
            helper.make_node("Sub", [scaled, f"{p}_mean"], [f"{p}_centred"], name=f"{p}_sub"),
            helper.make_node("Div", [f"{p}_centred", f"{p}_std"], [into], name=f"{p}_div"),
        ]
        inits += [
            numpy_helper.from_array(np.asarray(spec.mean, np.float32).reshape(1, 3, 1, 1), f"{p}_mean"),
            numpy_helper.from_array(np.asarray(spec.std, np.float32).reshape(1, 3, 1, 1), f"{p}_std"),
        ]
    return nodes, inits


def uint8_input_graph(model: onnx.ModelProto, spec: InputSpec) -> onnx.ModelProto:
    """A copy of ``model`` (float32 NCHW input ``spec.name``) whose input of the same name takes ``(B, H, W, 3)``
    uint8 RGB pixels, normalised by its first nodes as ``spec`` says; its ``input_spec`` metadata follows.

    Raises:
        ValueError: ``spec`` is already uint8, the model has no such float32 ``[B, 3, H, W]`` input, or it already
            holds tensors of the names this adds.
    """
    if spec.pixels_in_graph:
        raise ValueError("the bundle's input is already uint8 NHWC (preprocessing in the graph)")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    idx, batch = _check_input(graph, spec)
    used = {t for n in graph.node for t in (*n.input, *n.output)} | {i.name for i in graph.initializer}
    if any(name.startswith(_PREFIX) for name in used):
        raise ValueError(f"the model already has tensors named {_PREFIX}*: converted before?")
    inner = f"{_PREFIX}_nchw"
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == spec.name:
                node.input[k] = inner
    nodes, inits = _normalise_nodes(spec, inner)
    graph.input[idx].CopyFrom(
        helper.make_tensor_value_info(spec.name, TensorProto.UINT8, [batch, spec.height, spec.width, 3])
    )
    graph.initializer.extend(inits)
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *rest])
    meta = {p.key: p.value for p in out.metadata_props}
    meta["input_spec"] = uint8_input_spec(spec).model_dump_json()
    del out.metadata_props[:]
    for key, value in meta.items():
        out.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(out)
    return out


@dataclass(frozen=True)
class Uint8InputOptions:
    source: Path  # bundle directory with a float NCHW input (may equal ``out`` with ``overwrite``)
    out: Path
    version: str | None = None  # default: the source version + "-u8"
    overwrite: bool = False


def _check(o: Uint8InputOptions) -> ModelBundle:
    if o.out.exists() and any(o.out.iterdir()) and not o.overwrite:
        raise ExportError(o.out, "exists and is not empty; choose a new directory or pass --overwrite", 2)
    if o.out.exists() and any(o.out.iterdir()) and not (o.out / BUNDLE_FILE).is_file():
        raise ExportError(o.out, "--overwrite only replaces a bundle directory (it has no bundle.json)", 2)
    try:
        bundle = load_bundle(o.source)
    except BundleError as exc:
        raise ExportError(exc.path, exc.problem, 2) from exc
    if bundle.input.pixels_in_graph:
        raise ExportError(o.source, "its input is already uint8 NHWC (preprocessing in the graph)", 2)
    if bundle.openvino is not None and bundle.openvino.int8_file is not None:
        raise ExportError(
            o.source / bundle.openvino.int8_file,
            "an OpenVINO INT8 IR is not ONNX: this step cannot give it a uint8 input, so a bundle with one cannot be "
            "converted (export one without the IR to convert it)",
            2,
        )
    return bundle


def _onnx_files(bundle: ModelBundle) -> list[str]:
    return [f for f in (bundle.onnx.file, bundle.onnx.fp16_file, bundle.onnx.int8_file) if f is not None]


def _parity(source: ModelBundle, stage: Path, spec: InputSpec) -> dict[str, dict[str, Any]]:
    """Each converted model vs its float original on ONNX Runtime CPU, on seeded synthetic images: one
    ``parity.json`` comparison per model, ``uint8_input_vs_float_input:<file>``."""
    from export.runtimes import OrtRunner

    size = (source.input.height, source.input.width)
    boxed = [letterbox(im, size, source.input.pad_value)[0] for im in synthetic_images(PARITY_IMAGES, seed=1)]
    x_float: npt.NDArray[np.float32] = to_input(boxed, source.input)
    x_u8: npt.NDArray[Any] = to_input(boxed, spec)  # (B, H, W, 3) uint8
    comparisons: dict[str, dict[str, Any]] = {}
    for name in _onnx_files(source):
        ref, cand = OrtRunner(source.path(name))(x_float), OrtRunner(stage / name)(x_u8)
        diff = raw_diff(ref, cand)
        failures = [f"{k} {diff[k]:.3g} > {bound:g}" for k, bound in UINT8_TOLERANCE.items() if diff[k] > bound]
        comparisons[f"{COMPARISON}:{name}"] = {
            "reference": f"onnxruntime CPU, float NCHW input normalised by service.core.preprocess ({name})",
            "candidate": f"onnxruntime CPU, uint8 NHWC input normalised in the graph ({name})",
            "passed": not failures,
            "failures": failures,
            "raw": diff,
            "detections": {"match_rate": None, "iou_min": None},  # raw outputs compared: equal outputs, equal boxes
            "tolerance": UINT8_TOLERANCE,
            "images": {"count": PARITY_IMAGES, "source": f"synthetic ({PARITY_IMAGES} seeded images, seed 1)"},
        }
    return comparisons


def _write_parity(stage: Path, comparisons: dict[str, dict[str, Any]]) -> dict[str, Any]:
    path = stage / "parity.json"
    parity: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    kept = {k: v for k, v in parity.get("comparisons", {}).items() if not k.startswith(COMPARISON)}
    parity["comparisons"] = {**kept, **comparisons}
    parity["passed"] = all(c.get("passed", False) for c in parity["comparisons"].values())
    path.write_text(json.dumps(parity, indent=2) + "\n", encoding="utf-8")
    return parity


def _converted(bundle: ModelBundle, o: Uint8InputOptions) -> ModelBundle:
    tools = {"onnx": onnx.__version__}
    record = {"from_version": bundle.version, "at": datetime.now(UTC).isoformat(timespec="seconds"),
              "tools": tools, "dropped_engine": bundle.engine is not None}  # fmt: skip
    return bundle.model_copy(
        update={
            "schema_version": 2,
            "input": uint8_input_spec(bundle.input),
            "engine": None,
            "version": o.version or f"{bundle.version}-u8",
            "provenance": {**bundle.provenance, "uint8_input": record},
        }
    )


def run_uint8_input(o: Uint8InputOptions, progress: Progress | None = None) -> ExportResult:
    """Convert the bundle at ``o.source`` into ``o.out``; raise :class:`ExportError` (nothing at ``o.out`` changes)
    on failure (exit 2: bad input, 1: parity beyond :data:`UINT8_TOLERANCE`)."""
    progress = progress or Progress(total=0, quiet=True)
    with progress.step(f"load bundle {o.source.name}"):
        bundle = _check(o)
    stage = o.out.parent / f".{o.out.name}.partial"
    if stage.exists():
        shutil.rmtree(stage)
    skip = {BUNDLE_FILE, *([bundle.engine.file, bundle.engine.build_record] if bundle.engine else [])}
    shutil.copytree(bundle.path("."), stage, ignore=lambda _d, names: [n for n in names if n in skip])
    try:
        spec = uint8_input_spec(bundle.input)
        with progress.step(f"uint8 NHWC input in {', '.join(_onnx_files(bundle))}"):
            for name in _onnx_files(bundle):
                try:
                    model = uint8_input_graph(onnx.load(str(bundle.path(name))), bundle.input)
                except ValueError as exc:
                    raise ExportError(bundle.path(name), str(exc), 2) from exc
                onnx.save(model, str(stage / name))
        with progress.step("parity: uint8 graph vs float graph (onnxruntime)"):
            comparisons = _parity(bundle, stage, spec)
            parity = _write_parity(stage, comparisons)
        failures = {k: c["failures"] for k, c in comparisons.items() if c["failures"]}
        if failures:
            raise ExportError(o.out, f"uint8 input parity failed: {failures}", 1)
        with progress.step("write bundle.json (sha256 of every file) and verify"):
            write_bundle(_converted(bundle, o), stage)
            load_bundle(stage)
        if o.out.exists():
            shutil.rmtree(o.out)
        stage.rename(o.out)
        notes = ("the TensorRT engine was left out: the service builds one from the converted model.onnx",)
        return ExportResult(o.out, load_bundle(o.out), parity, dict((bundle.calibration or {}).get("per_class", {})),
                            notes if bundle.engine else ())  # fmt: skip
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
