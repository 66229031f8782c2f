"""torch detector -> ONNX: fused Conv+BN, decode inside the graph, dynamic batch, pinned opset, onnxslim, checker.

The graph is ``images [B, 3, H, W] float32 (0-1 after the bundle's normalisation) -> output0 [B, 4+nc, A]`` with
rows cx, cy, w, h (input pixels) then per-class sigmoid scores. The TorchScript exporter (``dynamo=False``) is used:
it is the path verified for DySample's GridSample (opset >= 16) on this torch version.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch

from models import Detector, InferenceModel, fuse_model
from service.core.bundle import InputSpec

__all__ = ["INPUT_NAME", "MIN_OPSET", "OUTPUT_NAME", "OnnxExport", "export_onnx", "read_metadata"]

logger = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "output0"
MIN_OPSET = 17  # GridSample (DySample) needs 16; 17 is the pinned floor for every variant so bundles are uniform


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    opset: int
    num_anchors: int
    nc: int
    slimmed: bool


def _slim(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    try:
        import onnxslim
    except ImportError:
        logger.warning("onnxslim is not installed; the ONNX is left unsimplified")
        return model, False
    return onnxslim.slim(model), True


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def export_onnx(
    detector: Detector,
    path: Path,
    *,
    spec: InputSpec,
    class_names: list[str],
    opset: int = MIN_OPSET,
    metadata: dict[str, Any] | None = None,
) -> OnnxExport:
    """Fuse ``detector`` (in place), export it to ``path`` and check the result.

    Args:
        detector: eval-mode detector on CPU; its ``nc`` must equal ``len(class_names)``.
        spec: the bundle's input spec (size, normalisation); embedded as metadata with the class names.
        opset: ONNX opset, >= :data:`MIN_OPSET`.
        metadata: more string-able key/values for ``metadata_props`` (architecture, source checkpoint hash, ...).

    Raises:
        ValueError: opset too low or class count mismatch.
        onnx.checker.ValidationError: the exported graph is invalid.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"--opset {opset}: must be >= {MIN_OPSET} (DySample's GridSample needs >= 16)")
    if detector.nc != len(class_names):
        raise ValueError(f"model has nc={detector.nc} but {len(class_names)} class names")
    fuse_model(detector)
    wrapped = InferenceModel(detector).eval()
    dummy = torch.zeros(1, 3, spec.height, spec.width)
    buf = io.BytesIO()
    # The tracer warns about Python-side shape logic (anchor grids) that is constant for a fixed input size; the
    # checker and the parity step are the real verification, so those warnings would only bury the progress display.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            (dummy,),
            buf,  # type: ignore[arg-type]  # a file-like object is accepted; torch's annotation says path only
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load_from_string(buf.getvalue())
    model, slimmed = _slim(model)
    meta = {
        "classes": json.dumps(class_names),
        "input_spec": spec.model_dump_json(),
        "output_layout": "B,4+nc,A; cx,cy,w,h in input pixels; sigmoid class scores",
        **{k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()},
    }
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "aoi-inspect"
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    out_dims = model.graph.output[0].type.tensor_type.shape.dim
    num_anchors = out_dims[2].dim_value if len(out_dims) == 3 else 0
    if num_anchors <= 0:
        with torch.no_grad():
            num_anchors = int(wrapped(dummy).shape[2])
    return OnnxExport(path=path, opset=opset, num_anchors=int(num_anchors), nc=detector.nc, slimmed=slimmed)
