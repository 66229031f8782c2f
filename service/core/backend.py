"""The seam between the service and an inference runtime: the :class:`InferenceBackend` protocol, which the offline
steps (:mod:`service.core.offline`), the batcher and every runtime in :mod:`service.backends` meet on."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = ["InferenceBackend"]


@runtime_checkable
class InferenceBackend(Protocol):
    """One loaded model on one runtime.

    ``infer`` takes ``(B, 3, H, W)`` float32 (normalised as the bundle says), or ``(B, H, W, 3)`` uint8 pixels for a
    bundle whose graph normalises its own input (``InputSpec.pixels_in_graph``), with ``B`` in ``batch_sizes``, and
    returns ``(B, 4+nc, A)`` float32. Calls come from at most ``max_instances`` worker threads at once: a backend that
    may be called concurrently (ONNX Runtime: one session per instance) says so with a ``max_instances`` attribute;
    one without it is called from one thread at a time (:func:`backend_max_instances`).
    """

    kind: str  # "tensorrt" | "onnxruntime-cuda" | "onnxruntime-cpu" (or a test double's name)
    device: str  # what really runs it, e.g. "cpu" or "cuda:0 NVIDIA H100"
    precision: str  # "fp32" | "fp16"
    batch_sizes: tuple[int, ...]  # ascending; the batcher pads a batch up to the next served size

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...

    def warmup(self) -> dict[int, float]: ...

    def close(self) -> None: ...
