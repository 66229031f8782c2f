"""Model bundle: the directory contract between export/ (writer) and service/ (reader).

A bundle is ``bundle.json`` + ``model.onnx`` (+ optional ``model.fp16.onnx``, ``model.int8.xml/.bin`` for OpenVINO,
TensorRT engine and its build record, + ``parity.json``).
``bundle.json`` says everything the service must not guess: input size and normalisation, class names, output layout,
per-class score thresholds, NMS settings, the OK/NG verdict rule, provenance and the sha256 of every other file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.core.errors import format_validation_error

__all__ = [
    "BUNDLE_FILE",
    "SCHEMA_VERSION",
    "BundleError",
    "EngineSpec",
    "InputSpec",
    "ModelBundle",
    "OnnxSpec",
    "OpenVinoSpec",
    "OutputSpec",
    "PostprocessSpec",
    "ScoreThresholds",
    "TilingSpec",
    "VerdictRule",
    "load_bundle",
    "sha256_file",
    "write_bundle",
]

BUNDLE_FILE = "bundle.json"
# 1: every bundle with a float NCHW input. 2: the same fields, plus a uint8 NHWC input (preprocessing inside the
# graph); a bundle with that input must say 2, so that a reader written before it refuses it by its version.
SCHEMA_VERSION = 2


class BundleError(Exception):
    """A bundle file is missing, corrupt or inconsistent. ``path`` names the file, ``problem`` says what is wrong."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


def _check_thresholds(v: dict[str, float]) -> dict[str, float]:
    bad = {k: t for k, t in v.items() if not 0.0 < t < 1.0}
    if bad:
        raise ValueError(f"score thresholds must be in (0, 1): {bad}")
    return v


# Per-class score thresholds keyed by class name, each in (0, 1); shared by bundle.json and the service settings.
ScoreThresholds = Annotated[dict[str, float], AfterValidator(_check_thresholds)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """Network input: letterboxed RGB uint8 pixels become ``(x * scale - mean) / std`` per channel, NCHW, in one of
    two places.

    - ``layout`` NCHW, ``dtype`` float32/float16 (every bundle before schema version 2): the service computes it and
      feeds ``(B, 3, H, W)`` floats.
    - ``layout`` NHWC, ``dtype`` uint8 (``aoi export --from-bundle DIR --uint8-input``, schema version 2): the model
      takes the letterboxed pixels ``(B, H, W, 3)`` as they are and its first nodes do the cast, scale, mean/std and
      transpose; ``scale``, ``mean`` and ``std`` then record what the graph computes.
    """

    name: str = "images"
    width: int = Field(gt=0, multiple_of=32)
    height: int = Field(gt=0, multiple_of=32)
    channels: Literal[3] = 3
    color: Literal["RGB"] = "RGB"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: Literal["float32", "float16", "uint8"] = "float32"
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # Letterbox: keep aspect ratio, centre the image, pad with this grey level (114 matches YOLO training).
    pad_value: int = Field(default=114, ge=0, le=255)

    @model_validator(mode="after")
    def _layout_with_dtype(self) -> InputSpec:
        if (self.dtype == "uint8") != (self.layout == "NHWC"):
            raise ValueError(
                f"input: layout {self.layout} with dtype {self.dtype}; a uint8 input is NHWC (preprocessing in the "
                "graph), a float32/float16 input NCHW"
            )
        return self

    @property
    def pixels_in_graph(self) -> bool:
        """The model takes uint8 NHWC pixels and normalises them itself."""
        return self.dtype == "uint8"

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """One model input without the batch axis: ``(H, W, 3)`` for NHWC, ``(3, H, W)`` for NCHW."""
        if self.layout == "NHWC":
            return self.height, self.width, self.channels
        return self.channels, self.height, self.width


class OutputSpec(_Strict):
    """Network output ``[B, 4 + nc, A]``: rows 0-3 are cx, cy, w, h in letterboxed-input pixels, then per-class
    sigmoid scores (no objectness). ``num_anchors`` is A at the bundle's input size."""

    name: str = "output0"
    layout: Literal["B,4+nc,A"] = "B,4+nc,A"
    box_format: Literal["cxcywh"] = "cxcywh"
    score_activation: Literal["sigmoid"] = "sigmoid"
    num_anchors: int = Field(gt=0)


CpuPrecisionName = Literal["bf16", "int8", "fp32"]
OrtCpuPrecisionName = Literal["int8", "fp32"]


def _fp32_only() -> list[CpuPrecisionName]:
    return ["fp32"]


def _ort_fp32_only() -> list[OrtCpuPrecisionName]:
    return ["fp32"]


class OnnxSpec(_Strict):
    """The fp32 ONNX model, and optionally its float16 variant for ONNX Runtime's CUDA provider (``fp16_file``:
    float16 weights and activations, float32 inputs and outputs, same tensor names; written by
    ``aoi export --fp16-onnx`` with its own parity numbers in ``parity.json``) and its INT8 variant for ONNX
    Runtime's CPU provider (``int8_file``: static QDQ, float32 inputs and outputs, same names; ``aoi export --int8``).

    ``cpu_precisions``: the precisions of ONNX Runtime CPU that export measured within their bound (INT8: mAP50 at
    most 1.0 pt below fp32 in ``parity.json``), fastest first as measured; ``precision: auto`` on ``onnxruntime-cpu``
    serves the first.
    """

    file: str = "model.onnx"
    fp16_file: str | None = None
    int8_file: str | None = None
    cpu_precisions: list[OrtCpuPrecisionName] = Field(default_factory=_ort_fp32_only, min_length=1)
    opset: int = Field(ge=11)
    dynamic_batch: bool = True
    max_batch: int = Field(default=16, ge=1)

    @model_validator(mode="after")
    def _int8_listed_with_its_file(self) -> OnnxSpec:
        if ("int8" in self.cpu_precisions) != (self.int8_file is not None):
            raise ValueError("onnx.cpu_precisions lists int8 exactly when onnx.int8_file is set")
        return self


class OpenVinoSpec(_Strict):
    """CPU precisions for the OpenVINO backend, written by ``aoi export`` with their accuracy in ``parity.json``.

    ``precisions``: those export measured within their bound (mAP50 delta vs fp32 at most 0.5 pt for bf16, 1.0 pt for
    int8), fastest first as measured; the service's ``precision: auto`` takes the first one the CPU can run.
    ``int8_file``: the NNCF-quantised OpenVINO IR (``.xml``; its weights are the ``.bin`` of the same stem).
    """

    int8_file: str | None = None
    precisions: list[CpuPrecisionName] = Field(default_factory=_fp32_only, min_length=1)

    @property
    def int8_weights(self) -> str | None:
        return None if self.int8_file is None else self.int8_file.removesuffix(".xml") + ".bin"


class CpuChoice(_Strict):
    """One CPU runtime and precision of a bundle, an entry of ``cpu_ranking``."""

    backend: Literal["openvino", "onnxruntime-cpu"]
    precision: CpuPrecisionName


class EngineSpec(_Strict):
    """A serialized TensorRT engine and its build record (JSON: TensorRT version, GPU, compute capability, profiles)."""

    file: str = "model.engine"
    build_record: str = "engine.json"
    precision: Literal["fp16", "fp32"] = "fp16"


class PostprocessSpec(_Strict):
    """Per-class score thresholds (keyed by class name), class-aware NMS IoU and detection caps."""

    score_thresholds: ScoreThresholds
    default_threshold: float = Field(default=0.25, gt=0.0, lt=1.0)
    nms_iou: float = Field(default=0.7, gt=0.0, le=1.0)
    max_detections: int = Field(default=300, ge=1)
    max_candidates: int = Field(default=30000, ge=1)


class TilingSpec(_Strict):
    """The model's native scale and the tiling it implies (docs/service.md, "Tiling").

    ``tile_width`` x ``tile_height`` are the frame pixels one model input covers when a frame is seen at the scale the
    model was trained at: NEU-DET's 200 px images letterboxed to 256 give 200 x 200 tiles (1.28 input pixels per
    frame pixel). A frame larger than that field is cut into tiles overlapping by at least ``overlap`` of a tile
    side; ``full_frame`` adds one letterboxed pass of the whole frame for defects larger than a tile; detections of
    neighbouring tiles whose parts in the shared window have IoU > ``match_iou`` are joined into one box.
    """

    mode: Literal["auto", "on", "off"] = "auto"
    tile_width: int = Field(gt=0)
    tile_height: int = Field(gt=0)
    overlap: float = Field(default=0.25, ge=0.0, le=0.75)
    full_frame: bool = False
    match_iou: float = Field(default=0.5, gt=0.0, le=1.0)
    source: str = Field(default="", description="how the native scale was found (training data, --native-tile)")


class VerdictRule(_Strict):
    """NG when at least one surviving detection has a class in ``reject_classes`` (None = every class) and a box
    area in original-image pixels >= ``min_box_area``."""

    reject_classes: list[str] | None = None
    min_box_area: float = Field(default=0.0, ge=0.0)


class ModelBundle(_Strict):
    """``bundle.json``. ``root`` is the bundle directory, filled in by :func:`load_bundle` (never serialised)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    schema_version: Literal[1, 2] = 1  # 2 only where needed (a uint8 input), so older readers keep loading the rest
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    architecture: str = Field(min_length=1)
    classes: list[str] = Field(min_length=1)
    input: InputSpec
    output: OutputSpec
    onnx: OnnxSpec
    engine: EngineSpec | None = None
    openvino: OpenVinoSpec | None = None  # None (bundles before 1.4): OpenVINO serves the fp32 ONNX only
    # Every CPU runtime and precision export measured within its bound, fastest first as timed side by side; what
    # `backend: auto` serves on a CPU (the first this CPU runs). Empty (bundles before 1.5): ONNX Runtime, OpenVINO.
    cpu_ranking: list[CpuChoice] = Field(default_factory=list)
    postprocess: PostprocessSpec
    verdict: VerdictRule = VerdictRule()
    tiling: TilingSpec | None = None  # None (bundles before 1.3): no native scale known, frames are letterboxed whole
    calibration: dict[str, Any] | None = None
    provenance: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict, description="sha256 of every other file in the bundle")
    root: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _consistent(self) -> ModelBundle:
        if self.input.pixels_in_graph and self.schema_version < 2:
            raise ValueError("a uint8 NHWC input needs schema_version 2 (a reader before it would feed floats)")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"class names must be unique: {self.classes}")
        unknown = set(self.postprocess.score_thresholds) - set(self.classes)
        if unknown:
            raise ValueError(f"score_thresholds name unknown classes: {sorted(unknown)}")
        if self.verdict.reject_classes is not None:
            unknown = set(self.verdict.reject_classes) - set(self.classes)
            if unknown:
                raise ValueError(f"verdict.reject_classes name unknown classes: {sorted(unknown)}")
        for c in self.cpu_ranking:
            listed = (
                self.onnx.cpu_precisions
                if c.backend == "onnxruntime-cpu"
                else (self.openvino or OpenVinoSpec()).precisions
            )
            if c.precision not in listed:
                raise ValueError(f"cpu_ranking names {c.backend} {c.precision}, which its section does not list")
        return self

    @property
    def nc(self) -> int:
        return len(self.classes)

    def thresholds(self) -> list[float]:
        """Score threshold per class id (class order of ``classes``); missing classes use ``default_threshold``."""
        pp = self.postprocess
        return [pp.score_thresholds.get(c, pp.default_threshold) for c in self.classes]

    def path(self, name: str) -> Path:
        if self.root is None:
            raise BundleError(name, "bundle has no root directory (not loaded from disk)")
        return self.root / name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_bundle(root: Path | str, *, verify_hashes: bool = True) -> ModelBundle:
    """Read and validate ``<root>/bundle.json`` and the files it names.

    Raises:
        BundleError: naming the file and the problem (missing directory or file, invalid JSON, schema violation,
            sha256 mismatch, ONNX/engine file not listed in ``files``).
    """
    root = Path(root)
    meta_path = root / BUNDLE_FILE
    if not root.is_dir():
        raise BundleError(root, "bundle directory does not exist (export one with `aoi export`, see README)")
    if not meta_path.is_file():
        raise BundleError(meta_path, "missing; a bundle directory must contain bundle.json (written by `aoi export`)")
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(meta_path, f"not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise BundleError(meta_path, "top level must be a JSON object")
    try:
        bundle = ModelBundle.model_validate({**raw, "root": root})
    except ValidationError as exc:
        raise BundleError(meta_path, f"invalid bundle.json: {format_validation_error(exc)}") from exc

    required = [bundle.onnx.file]
    required += [f for f in (bundle.onnx.fp16_file, bundle.onnx.int8_file) if f is not None]
    if bundle.engine is not None:
        required += [bundle.engine.file, bundle.engine.build_record]
    if bundle.openvino is not None and bundle.openvino.int8_file is not None:
        required += [bundle.openvino.int8_file, str(bundle.openvino.int8_weights)]
    for name in required:
        if not (root / name).is_file():
            raise BundleError(root / name, "missing (named in bundle.json)")
        if name not in bundle.files:
            raise BundleError(meta_path, f"files has no sha256 for {name}")
    if verify_hashes:
        for name, digest in bundle.files.items():
            path = root / name
            if not path.is_file():
                raise BundleError(path, "missing (listed in bundle.json files)")
            actual = sha256_file(path)
            if actual != digest:
                raise BundleError(path, f"sha256 mismatch: bundle.json says {digest[:12]}..., file is {actual[:12]}...")
    return bundle


def write_bundle(bundle: ModelBundle, root: Path | str) -> Path:
    """Write ``bundle.json`` into ``root``, recording the sha256 of every other regular file in the directory.

    Returns the path of the written ``bundle.json``. The returned file is what :func:`load_bundle` reads back.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    files = {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != BUNDLE_FILE
    }
    data = bundle.model_copy(update={"files": files}).model_dump(mode="json", exclude={"root"})
    out = root / BUNDLE_FILE
    out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return out
