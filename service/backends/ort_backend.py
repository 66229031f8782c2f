"""ONNX Runtime backend: CPU, CUDA or TensorRT execution provider, fp32 or the bundle's FP16 ONNX.

ONNX Runtime silently falls back to the next provider when one cannot load (missing CUDA/cuDNN/TensorRT libraries),
so the providers the session really got are checked and a fallback is an error, never a pretence. What is asked of
ONNX Runtime (file, precision, provider options) is decided by the pure functions of ``ort_providers``.
"""

from __future__ import annotations

import ctypes
import logging
import queue
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from service.backends.base import check_input_type, check_output, run_warmup, served_batch_sizes
from service.backends.ort_providers import (
    EP_NAMES,
    OnnxModelChoice,
    Precision,
    Provider,
    ort_trt_cache_dirs,
    provider_list,
    select_onnx_model,
    trt_provider_options,
)
from service.core.bundle import ModelBundle, sha256_file
from service.core.errors import BackendUnavailable

__all__ = ["OrtBackend", "ort_cuda_unavailable_reason", "ort_trt_unavailable_reason"]

logger = logging.getLogger(__name__)
_KIND: dict[Provider, str] = {"cpu": "onnxruntime-cpu", "cuda": "onnxruntime-cuda", "tensorrt": "onnxruntime-trt"}


def ort_cuda_unavailable_reason() -> str | None:
    """None when this onnxruntime build offers the CUDA execution provider, else why not."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return f"onnxruntime is not installed ({exc})"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install the gpu extra: onnxruntime-gpu)"
    return None


def _tensorrt_version() -> str | None:
    """TensorRT version whose libraries ONNX Runtime's TensorRT provider will load, or None when there are none.

    Importing the ``tensorrt`` wheel loads its ``libnvinfer.so.10`` into the process, where the provider's own
    dynamic-linker lookup (by soname) finds it; otherwise the system library path must have it.
    """
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except ImportError:
        pass
    try:
        lib = ctypes.CDLL("libnvinfer.so.10")
    except OSError:
        return None
    v = int(lib.getInferLibVersion())  # e.g. 100300 = 10.3.0
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}"


def ort_trt_unavailable_reason() -> str | None:
    """None when onnxruntime offers the TensorRT provider, TensorRT 10 libraries load and a CUDA GPU is visible."""
    from service.backends.trt_build import query_gpu

    reason = ort_cuda_unavailable_reason()
    if reason is not None:
        return reason
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no TensorrtExecutionProvider (install the gpu extra)"
    if _tensorrt_version() is None:
        return "TensorRT 10 libraries (libnvinfer.so.10) not found: install the gpu extra (tensorrt-cu13)"
    try:
        query_gpu()
    except OSError as exc:
        return f"no CUDA GPU visible ({exc})"
    return None


# The model input's ONNX Runtime type -> what the batch is cast to (float32 rows feed a float16 model, uint8 rows
# a graph that normalises its own input; any other type is refused against the bundle by check_input_type).
_ORT_INPUT_TYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8,
}  # fmt: skip


class OrtBackend:
    """``kind`` is ``onnxruntime-cpu``, ``onnxruntime-cuda`` or ``onnxruntime-trt`` (``provider`` cpu, cuda,
    tensorrt); inputs are cast to the model's input dtype. ``precision`` (auto | fp32 | fp16) picks the ONNX file
    (see :func:`~service.backends.ort_providers.select_onnx_model`); ``engine_cache`` is the service's engine-cache
    directory (TensorRT provider only). ``sessions``: one ONNX Runtime session per model instance, each with its own
    ``intra_op_threads`` pool (and, on CUDA, its own stream); ``infer`` runs on a free one."""

    MAX_SESSIONS = 64

    def __init__(
        self,
        bundle: ModelBundle,
        *,
        provider: Provider = "cpu",
        device_id: int = 0,
        max_batch_size: int = 8,
        intra_op_threads: int = 0,
        precision: Precision = "auto",
        engine_cache: Path = Path("engine-cache"),
        sessions: int = 1,
    ) -> None:
        if not 1 <= sessions <= self.MAX_SESSIONS:
            raise ValueError(f"sessions must be 1..{self.MAX_SESSIONS}, got {sessions}")
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable(f"onnxruntime is not installed ({exc}); pip install -e '.[cpu]'") from exc
        self.kind = _KIND[provider]
        # One session per model instance: each has its own intra-op thread pool (instances sharing a session would
        # share one pool) and, on CUDA, its own stream; so it runs as many batches at once as it has sessions.
        self.max_instances = sessions
        self.intra_op_threads = intra_op_threads
        self._bundle = bundle
        reason = {"cpu": None, "cuda": ort_cuda_unavailable_reason, "tensorrt": ort_trt_unavailable_reason}[provider]
        if reason is not None and (why := reason()):
            raise BackendUnavailable(f"{self.kind}: {why}")
        self.choice: OnnxModelChoice = select_onnx_model(bundle.onnx, provider, precision)
        self.precision: str = self.choice.precision
        if self.choice.precision == "fp16" and provider == "cpu":
            logger.warning("serving the FP16 ONNX on CPU as requested; it is usually slower than fp32 there")
        self._path = bundle.path(self.choice.file)
        self.device = f"cuda:{device_id}" if provider != "cpu" else "cpu"
        trt_options = None
        if provider == "tensorrt":
            trt_options = self._trt_options(ort, device_id, max_batch_size, engine_cache)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if provider == "cpu":
            # ONNX Runtime's memory pattern, per input shape, grows the process at the first burst of concurrent full
            # batches after warm-up and keeps it; off, RSS under load stays at its level after warm-up and inference
            # is no slower (docs/measurements.md, M3).
            opts.enable_mem_pattern = False
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        providers = provider_list(provider, device_id=device_id, trt_options=trt_options)
        self._session = self._new_session(ort, opts, providers)
        self._check_providers(provider)
        self.sessions = sessions
        self._free: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._free.put(self._session)
        self._input_name, self._output_name = self._io_names()
        batch_dim = self._session.get_inputs()[0].shape[0]
        dynamic = not isinstance(batch_dim, int)
        self.batch_sizes = served_batch_sizes(
            max_batch_size, bundle.onnx.max_batch, dynamic, None if dynamic else int(batch_dim)
        )
        self._dtype = _ORT_INPUT_TYPES.get(self._input_type(), np.float32)
        check_input_type(np.dtype(self._dtype).name, bundle, str(self._path))
        for _ in range(sessions - 1):  # same options; a TensorRT provider loads the engine the first one cached
            self._free.put(self._new_session(ort, opts, providers))
        logger.info("%s: %s (%s; %s) on %s", self.kind, self._path, self.precision, self.choice.reason, self.device)

    def _new_session(self, ort: Any, opts: Any, providers: list[Any]) -> Any:
        try:
            return ort.InferenceSession(str(self._path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt or unsupported models
            raise BackendUnavailable(f"{self._path}: ONNX Runtime cannot load the model ({exc})") from exc

    def _trt_options(self, ort: Any, device_id: int, max_batch_size: int, engine_cache: Path) -> dict[str, Any]:
        from service.backends.trt_build import BatchProfile, query_gpu

        bundle = self._bundle
        top = max(1, min(max_batch_size, bundle.onnx.max_batch))
        profile = BatchProfile(min=1, opt=top, max=top) if bundle.onnx.dynamic_batch else None
        try:
            gpu = query_gpu(device_id)
        except OSError as exc:
            raise BackendUnavailable(f"{self.kind}: CUDA device {device_id} unusable ({exc})") from exc
        self.device = f"cuda:{device_id} {gpu.name}"
        engine_dir, timing_dir = ort_trt_cache_dirs(
            engine_cache,
            onnx_sha256=bundle.files.get(self.choice.file) or sha256_file(self._path),
            gpu_name=gpu.name,
            compute_capability=gpu.compute_capability,
            runtime_version=f"onnxruntime {ort.__version__} + TensorRT {_tensorrt_version()}",
            profile=profile or BatchProfile(1, 1, 1),
            fp16=self.precision == "fp16",
        )
        try:
            engine_dir.mkdir(parents=True, exist_ok=True)
            timing_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendUnavailable(f"{engine_dir}: cannot create the engine cache ({exc.strerror})") from exc
        logger.info("%s: engine cache %s (a first start builds TensorRT engines: minutes)", self.kind, engine_dir)
        spec = bundle.input
        return trt_provider_options(
            device_id=device_id,
            input_name=spec.name,
            input_chw=spec.sample_shape,
            profile=profile,
            fp16=self.precision == "fp16",
            engine_dir=engine_dir,
            timing_dir=timing_dir,
        )

    def _check_providers(self, provider: Provider) -> None:
        got = self._session.get_providers()
        if provider == "cpu":
            return
        if EP_NAMES[provider] not in got:
            fallback = "CUDA" if "CUDAExecutionProvider" in got else "CPU"
            raise BackendUnavailable(
                f"{self.kind}: ONNX Runtime fell back to {fallback} (session providers {got}); the "
                f"{'TensorRT' if provider == 'tensorrt' else 'CUDA/cuDNN'} libraries it needs are missing or do not "
                "match this GPU driver"
            )
        if provider == "tensorrt" and "CUDAExecutionProvider" not in got:
            logger.warning(
                "%s: no CUDA provider in the session (%s): nodes TensorRT rejects run on CPU", self.kind, got
            )

    def _input_type(self) -> str:
        return str(self._session.get_inputs()[0].type)

    def _io_names(self) -> tuple[str, str]:
        inputs = [i.name for i in self._session.get_inputs()]
        outputs = [o.name for o in self._session.get_outputs()]
        want_in, want_out = self._bundle.input.name, self._bundle.output.name
        if want_in not in inputs:
            raise BackendUnavailable(f"{self._path}: no input {want_in!r} (bundle.json input.name); has {inputs}")
        if want_out not in outputs:
            raise BackendUnavailable(f"{self._path}: no output {want_out!r} (bundle.json output.name); has {outputs}")
        return want_in, want_out

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        session = self._free.get()
        try:
            return self._run(session, batch)
        finally:
            self._free.put(session)

    def _run(self, session: Any, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        (out,) = session.run([self._output_name], {self._input_name: batch.astype(self._dtype, copy=False)})
        return check_output(np.asarray(out), batch.shape[0], self._bundle)

    def warmup(self) -> dict[int, float]:
        """Every session at every served batch size; returns the first session's latency in ms per size."""
        sessions = [self._free.get() for _ in range(self.sessions)]
        try:
            timings = [run_warmup(_OneSession(self, s), self._bundle) for s in sessions]
        finally:
            for s in sessions:
                self._free.put(s)
        return timings[0]

    def close(self) -> None:
        self._session = None
        while not self._free.empty():
            self._free.get_nowait()


class _OneSession:
    """An :class:`OrtBackend` pinned to one of its sessions (warm-up of each session)."""

    def __init__(self, backend: OrtBackend, session: Any) -> None:
        self.batch_sizes = backend.batch_sizes
        self._backend, self._session = backend, session

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return self._backend._run(self._session, batch)
