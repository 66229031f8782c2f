"""FP16 ONNX variant for ONNX Runtime's CUDA provider (``model.fp16.onnx``), converted from the fp32 bundle ONNX.

Weights and activations become float16; inputs and outputs stay float32 (``keep_io_types``) so the service feeds
and reads it exactly like the fp32 model. Converted with ``onnxruntime.transformers.float16``
(shipped with onnxruntime), then re-sorted by onnxslim.
"""

from __future__ import annotations

from pathlib import Path

import onnx

__all__ = ["FP16_FILE", "convert_to_fp16"]

FP16_FILE = "model.fp16.onnx"


def convert_to_fp16(src: Path, dst: Path) -> Path:
    """Write the float16 version of ``src`` to ``dst`` and check it with ``onnx.checker``.

    Raises:
        RuntimeError: the converter is unavailable in this onnxruntime build.
    """
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:
        raise RuntimeError(f"FP16 conversion needs onnxruntime.transformers ({exc})") from exc
    import onnxslim

    model = onnx.load(str(src))
    converted = convert_float_to_float16(model, keep_io_types=True)
    # keep_io_types appends the input Cast after the nodes that read it; onnxslim re-sorts the graph topologically.
    converted = onnxslim.slim(converted)
    onnx.checker.check_model(converted)
    onnx.save(converted, str(dst))
    return dst
