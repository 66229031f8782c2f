"""``aoi export --onnx``: wrap an Ultralytics-exported detection ONNX in a bundle, the file itself unchanged.

Facts come from the file: ``names``, ``imgsz``, ``stride``, ``batch`` and ``task`` from its metadata (parsed as Python
literals with ``ast.literal_eval``, never evaluated) and the input/output layout from the graph, checked by one
onnxruntime probe. A static batch axis (Ultralytics' default ``dynamic=False``) is served at batch 1; end-to-end
exports whose output is already ``[B, N, 6]`` after NMS are refused. See docs/byom.md.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from export.native_scale import native_tiling
from export.pipeline import (
    ExportError,
    ExportOptions,
    ExportResult,
    check_options,
    dataset_tag,
    git_commit,
    install_stage,
    load_samples,
    map_on_split,
    portable_path,
    score_thresholds,
    stage_dir,
    tool_versions,
    write_verified,
)
from export.report import Progress
from export.runtimes import OrtRunner, run_all
from service.core.bundle import InputSpec, ModelBundle, OnnxSpec, OutputSpec, PostprocessSpec, sha256_file

__all__ = ["OnnxFacts", "inspect_onnx", "parse_metadata", "wrap_onnx"]

_STRIDES = (8, 16, 32)  # the three detection levels of YOLOv8 / YOLO11
# Ultralytics metadata worth keeping in the bundle's provenance (never the export host's paths).
_KEPT_METADATA = ("description", "author", "date", "version", "task", "stride", "batch", "imgsz")
STATIC_BATCH_NOTE = "static batch axis of 1 in the ONNX file: the bundle serves one image per inference (max batch 1)"


@dataclass(frozen=True)
class OnnxFacts:
    """What the service needs to know about a foreign ONNX file, all read from the file."""

    names: list[str]
    width: int
    height: int
    input_name: str
    output_name: str
    input_dtype: Literal["float32", "float16"]
    dynamic_batch: bool
    opset: int
    num_anchors: int
    metadata: dict[str, str]


def _literal(metadata: dict[str, str], key: str) -> Any:
    try:
        return ast.literal_eval(metadata[key])
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        raise ValueError(f"metadata {key!r} = {metadata[key][:80]!r} is not a Python literal ({exc})") from None


def _names(value: Any) -> list[str]:
    if isinstance(value, dict) and sorted(value) == list(range(len(value))):
        value = [value[i] for i in range(len(value))]
    if not isinstance(value, list | tuple) or not value or not all(isinstance(n, str) for n in value):
        raise ValueError(
            f"metadata 'names' must be a list or a {{0: name, 1: ...}} dict of strings, got {value!r:.120}"
        )
    return list(value)


def parse_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """Ultralytics ONNX ``metadata_props`` -> ``{"names": [...], "imgsz": (h, w) | None, "stride", "batch", "task",
    "nms"}``.

    Raises:
        ValueError: no ``names`` (not an Ultralytics export), a value that is not a literal, another task, or an
            end-to-end export (``nms``/``end2end``).
    """
    if "names" not in metadata:
        raise ValueError("no 'names' in the ONNX metadata: not an Ultralytics export (export with ultralytics >= 8.0)")
    task = str(metadata.get("task", "detect"))
    if task != "detect":
        raise ValueError(f"task {task!r}: only detection exports (task 'detect') can be served")
    stride = _literal(metadata, "stride") if "stride" in metadata else max(_STRIDES)
    if stride != max(_STRIDES):
        raise ValueError(f"stride {stride!r}: only three-level (P3-P5, stride 32) detection exports can be served")
    imgsz = _literal(metadata, "imgsz") if "imgsz" in metadata else None
    if isinstance(imgsz, int):
        imgsz = (imgsz, imgsz)
    if imgsz is not None and not (
        isinstance(imgsz, list | tuple) and len(imgsz) == 2 and all(isinstance(v, int) for v in imgsz)
    ):
        raise ValueError(f"metadata 'imgsz' must be [height, width], got {imgsz!r}")
    args = _literal(metadata, "args") if "args" in metadata else {}
    end2end = _literal(metadata, "end2end") if "end2end" in metadata else False
    nms = bool(isinstance(args, dict) and args.get("nms")) or end2end is True
    return {
        "names": _names(_literal(metadata, "names")),
        "imgsz": tuple(imgsz) if imgsz is not None else None,
        "stride": stride,
        "batch": int(_literal(metadata, "batch")) if "batch" in metadata else None,
        "task": task,
        "nms": nms,
    }


def _dims(value_info: Any) -> list[int | str]:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def _nms_refusal(shape: tuple[int, ...] | list[int | str]) -> str:
    return (f"output {list(shape)} is already after NMS (an end-to-end export, nms=True): re-export without nms, "
            "the service runs its own class-aware NMS with per-class thresholds")  # fmt: skip


def inspect_onnx(path: Path, imgsz: int | None = None) -> OnnxFacts:
    """Read and check an Ultralytics detection ONNX: metadata, one image input, one ``[B, 4+nc, A]`` output.

    Args:
        imgsz: serve at this square side instead of the metadata's (only for exports with dynamic height/width).

    Raises:
        ValueError: the problem, in words (the caller names the file).
    """
    import onnx
    import onnxruntime as ort

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for files that are not ONNX
        raise ValueError(f"not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    metadata = {p.key: p.value for p in model.metadata_props}
    meta = parse_metadata(metadata)
    names: list[str] = meta["names"]
    init = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise ValueError(f"{len(inputs)} inputs and {len(model.graph.output)} outputs; a detection export has one "
                         "image input and one output (segmentation and pose exports have more)")  # fmt: skip
    in_dims, out_dims = _dims(inputs[0]), _dims(model.graph.output[0])
    if len(in_dims) != 4 or in_dims[1] != 3:
        raise ValueError(f"input {inputs[0].name} has shape {in_dims}, expected [batch, 3, height, width]")
    if meta["nms"] or (len(out_dims) == 3 and out_dims[2] == 6 and out_dims[1] != 4 + len(names)):
        raise ValueError(_nms_refusal(out_dims))
    batch = in_dims[0]
    if isinstance(batch, int) and batch != 1:
        raise ValueError(f"static batch axis of {batch}: re-export with batch=1 or dynamic=True")
    height, width = _input_size(in_dims, meta["imgsz"], imgsz)
    dtypes: dict[int, Literal["float32", "float16"]] = {
        onnx.TensorProto.FLOAT: "float32",
        onnx.TensorProto.FLOAT16: "float16",
    }
    elem = dtypes.get(inputs[0].type.tensor_type.elem_type)
    if elem is None:
        raise ValueError(f"input {inputs[0].name} is not float32 or float16")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    probe = np.zeros((1, 3, height, width), dtype=np.float16 if elem == "float16" else np.float32)
    out = session.run(None, {inputs[0].name: probe})[0]
    anchors = sum((height // s) * (width // s) for s in _STRIDES)
    if out.ndim == 3 and out.shape[2] == 6 and out.shape[1] != 4 + len(names):
        raise ValueError(_nms_refusal(out.shape))
    if tuple(out.shape) != (1, 4 + len(names), anchors):
        raise ValueError(f"output {model.graph.output[0].name} is {list(out.shape)} at {height}x{width}, but "
                         f"{len(names)} class names need [B, 4+nc={4 + len(names)}, A={anchors}]")  # fmt: skip
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxFacts(names, width, height, inputs[0].name, model.graph.output[0].name, elem, not isinstance(batch, int),
                     opset, anchors, metadata)  # fmt: skip


def _input_size(in_dims: list[int | str], meta_hw: tuple[int, int] | None, imgsz: int | None) -> tuple[int, int]:
    h, w = in_dims[2], in_dims[3]
    if isinstance(h, int) and isinstance(w, int):
        if imgsz is not None and (h, w) != (imgsz, imgsz):
            raise ValueError(f"--imgsz {imgsz}: the graph's input is fixed at {h}x{w}")
        size = (h, w)
    elif imgsz is not None:
        size = (imgsz, imgsz)
    elif meta_hw is not None:
        size = meta_hw
    else:
        raise ValueError("dynamic height/width and no 'imgsz' metadata: pass --imgsz")
    if any(v <= 0 or v % 32 for v in size):
        raise ValueError(f"input {size[0]}x{size[1]} is not a multiple of 32 (the largest stride)")
    return size


def _without_paths(text: str) -> str:
    """Metadata text with every path-like word cut to its last part ("trained on /home/x/data.yaml" -> "data.yaml"):
    Ultralytics writes the training host's paths as given, and no host path may enter a bundle."""
    return re.sub(r"\S*[/\\]\S*", lambda m: re.split(r"[/\\]", m.group().rstrip("/\\"))[-1], text)


def _provenance(o: ExportOptions, facts: OnnxFacts, digest: str) -> dict[str, Any]:
    return {
        "source_onnx": o.weights.name,
        "source_sha256": digest,
        "imported_from": {
            "format": "ultralytics-onnx",
            **{k: _without_paths(facts.metadata[k]) for k in _KEPT_METADATA if k in facts.metadata},
        },
        "served_batch": "dynamic" if facts.dynamic_batch else STATIC_BATCH_NOTE,
        "git_commit": git_commit(),
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "tools": tool_versions(),
        "export_options": {k: portable_path(v) if isinstance(v, Path) else v for k, v in asdict(o).items()},
    }


def _check(o: ExportOptions) -> None:
    if not o.weights.is_file():
        raise ExportError(o.weights, "ONNX file not found", 2)
    for flag, on in (("--engine", o.engine), ("--fp16-onnx", o.fp16_onnx)):
        if on:
            raise ExportError(flag, "not available with --onnx (the file is served as it is); the service can build "
                              "a TensorRT engine from the bundle's ONNX at first start", 2)  # fmt: skip
    check_options(o)


def wrap_onnx(o: ExportOptions, progress: Progress | None = None) -> ExportResult:
    """Check ``o.weights`` (an Ultralytics ONNX), score it on the calibration data and write a bundle at ``o.out``.

    Raises:
        ExportError: the file or an option is unusable (code 2); nothing at ``o.out`` changes.
    """
    progress = progress or Progress(total=0, quiet=True)
    _check(o)
    with progress.step("read ONNX metadata and check the output layout"):
        try:
            facts = inspect_onnx(o.weights, o.imgsz)
        except ValueError as exc:
            raise ExportError(o.weights, str(exc), 2) from None
        max_batch = o.max_batch if facts.dynamic_batch else 1
        if not facts.dynamic_batch:
            progress.note(STATIC_BATCH_NOTE)
    spec = InputSpec(name=facts.input_name, width=facts.width, height=facts.height, dtype=facts.input_dtype)
    with progress.step("load calibration images"):
        samples = load_samples(o, spec, facts.names, "ONNX metadata")
    stage = stage_dir(o.out)
    try:
        shutil.copyfile(o.weights, stage / "model.onnx")
        batch = min(o.batch_size, max_batch)
        with progress.step(f"onnxruntime fp32 on {len(samples)} images (batch {batch})"):
            ort = OrtRunner(stage / "model.onnx")
            run = run_all(ort, samples, len(facts.names), batch_size=batch)
        with progress.step("per-class score thresholds"):
            per_class, calibration = score_thresholds(o, run, samples, facts.names, progress)
        parity: dict[str, Any] = {
            "images": {"count": len(samples), "source": samples.source},
            "comparisons": {},
            "passed": True,
            "note": "an existing ONNX file served unchanged: no torch reference to compare against",
            "map": map_on_split(run, samples),
        }
        (stage / "parity.json").write_text(json.dumps(parity, indent=2) + "\n", encoding="utf-8")
        tiling, source = native_tiling(input_width=facts.width, input_height=facts.height, train_imgsz=facts.width,
                                       ckpt={}, calibration=samples.split, native_tile=o.native_tile,
                                       native_scale=o.native_scale, mode=o.tiling, overlap=o.tile_overlap,
                                       full_frame=o.full_frame)  # fmt: skip
        with progress.step("write bundle.json (sha256 of every file) and verify"):
            progress.note(f"native tile: {f'{tiling.tile_width}x{tiling.tile_height} frame px' if tiling else 'none'} "
                          f"({source})")  # fmt: skip
            digest = sha256_file(o.weights)
            bundle = ModelBundle(
                name=o.name or f"{o.weights.stem}.{dataset_tag(o.calibrate_data, {})}.fp32",
                version=o.version or datetime.now(UTC).strftime("%Y%m%d") + "-" + digest[:8],
                architecture="ultralytics-onnx",
                classes=facts.names,
                input=spec,
                output=OutputSpec(name=facts.output_name, num_anchors=facts.num_anchors),
                onnx=OnnxSpec(opset=facts.opset, dynamic_batch=facts.dynamic_batch, max_batch=max_batch),
                postprocess=PostprocessSpec(score_thresholds={n: float(t["threshold"]) for n, t in per_class.items()}),
                tiling=tiling,
                calibration=calibration,
                provenance=_provenance(o, facts, digest),
            )
            write_verified(bundle, stage)
        installed = install_stage(stage, o.out)
        notes = ("imported from an Ultralytics ONNX export; " + ("dynamic batch axis, served up to max batch "
                 f"{max_batch}" if facts.dynamic_batch else STATIC_BATCH_NOTE),)  # fmt: skip
        return ExportResult(o.out, installed, parity, per_class, notes)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
