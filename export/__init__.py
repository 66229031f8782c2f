"""Export stage: trained checkpoint -> ONNX (+ TensorRT FP16) model bundle with parity report and thresholds.

Importing this package is cheap and torch-free; the pipeline lives in :mod:`export.pipeline` (imports torch).
"""

__all__: list[str] = []
