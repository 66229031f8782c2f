"""ONNX Runtime backend (CPU or CUDA execution provider).

ONNX Runtime silently falls back to CPU when the CUDA provider cannot load (missing CUDA/cuDNN libraries), so the
providers the session really got are checked and a fallback is an error, never a pretence.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import numpy.typing as npt

from service.backends.base import check_output, run_warmup, served_batch_sizes
from service.bundle import ModelBundle
from service.errors import BackendUnavailable

__all__ = ["OrtBackend", "ort_cuda_unavailable_reason"]

logger = logging.getLogger(__name__)


def ort_cuda_unavailable_reason() -> str | None:
    """None when this onnxruntime build offers the CUDA execution provider, else why not."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return f"onnxruntime is not installed ({exc})"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install the gpu extra: onnxruntime-gpu)"
    return None


class OrtBackend:
    """``kind`` is ``onnxruntime-cpu`` or ``onnxruntime-cuda``; inputs are cast to the model's input dtype."""

    def __init__(
        self, bundle: ModelBundle, *, cuda: bool, device_id: int = 0, max_batch_size: int = 8, intra_op_threads: int = 0
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable(f"onnxruntime is not installed ({exc}); pip install -e '.[cpu]'") from exc
        self.kind = "onnxruntime-cuda" if cuda else "onnxruntime-cpu"
        self._bundle = bundle
        if cuda and (reason := ort_cuda_unavailable_reason()):
            raise BackendUnavailable(f"onnxruntime-cuda: {reason}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        providers: list[Any] = ["CPUExecutionProvider"]
        if cuda:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        path = bundle.path(bundle.onnx.file)
        try:
            self._session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt or unsupported models
            raise BackendUnavailable(f"{path}: ONNX Runtime cannot load the model ({exc})") from exc
        got = self._session.get_providers()
        if cuda and "CUDAExecutionProvider" not in got:
            raise BackendUnavailable(
                f"onnxruntime-cuda: ONNX Runtime fell back to CPU (session providers {got}); the CUDA/cuDNN libraries "
                "it needs are missing or do not match this GPU driver"
            )
        self.device = f"cuda:{device_id}" if cuda else "cpu"
        self.precision = "fp16" if self._input_type() == "tensor(float16)" else "fp32"
        self._input_name, self._output_name = self._io_names()
        batch_dim = self._session.get_inputs()[0].shape[0]
        dynamic = not isinstance(batch_dim, int)
        self.batch_sizes = served_batch_sizes(
            max_batch_size, bundle.onnx.max_batch, dynamic, None if dynamic else int(batch_dim)
        )
        self._dtype = np.float16 if self.precision == "fp16" else np.float32

    def _input_type(self) -> str:
        return str(self._session.get_inputs()[0].type)

    def _io_names(self) -> tuple[str, str]:
        inputs = [i.name for i in self._session.get_inputs()]
        outputs = [o.name for o in self._session.get_outputs()]
        want_in, want_out = self._bundle.input.name, self._bundle.output.name
        path = self._bundle.path(self._bundle.onnx.file)
        if want_in not in inputs:
            raise BackendUnavailable(f"{path}: no input named {want_in!r} (bundle.json input.name); model has {inputs}")
        if want_out not in outputs:
            raise BackendUnavailable(f"{path}: no output named {want_out!r} (bundle.json output.name); has {outputs}")
        return want_in, want_out

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        (out,) = self._session.run([self._output_name], {self._input_name: batch.astype(self._dtype, copy=False)})
        return check_output(np.asarray(out), batch.shape[0], self._bundle)

    def warmup(self) -> dict[int, float]:
        return run_warmup(self, self._bundle)

    def close(self) -> None:
        self._session = None
