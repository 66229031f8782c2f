"""Native TensorRT 10 backend: named I/O tensors, ``set_input_shape`` per batch, ``execute_async_v3`` on a CUDA stream,
pinned host buffers, one execution context per stream.

The engine comes from the bundle when its build record matches this GPU and TensorRT version; otherwise that engine is
refused (logged with the reason) and one is built from the bundle's ONNX and cached (``service.backends.trt_build``).
``tensorrt`` and libcuda are imported only when this backend is selected.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from service.backends import trt_build
from service.backends.base import check_input_type, check_output, run_warmup
from service.backends.ort_providers import Precision
from service.core.bundle import ModelBundle
from service.core.errors import BackendUnavailable

__all__ = ["TrtBackend"]

logger = logging.getLogger(__name__)


class TrtBackend:
    """``kind = "tensorrt"``. Serves the batch sizes of the engine's optimisation profile 0, capped by
    ``max_batch_size``."""

    kind = "tensorrt"

    def __init__(
        self,
        bundle: ModelBundle,
        *,
        device_id: int = 0,
        max_batch_size: int = 8,
        engine_cache: Path,
        precision: Precision = "auto",
    ) -> None:
        reason = trt_build.tensorrt_unavailable_reason()
        if reason is not None:
            raise BackendUnavailable(f"tensorrt: {reason}")
        import tensorrt as trt

        from service.backends.cuda_driver import CudaDevice, CudaError, PinnedBuffer

        self._bundle = bundle
        self._lock = threading.Lock()
        try:
            gpu = trt_build.query_gpu(device_id)
            self._cuda = CudaDevice(device_id)
        except (OSError, CudaError) as exc:
            raise BackendUnavailable(f"tensorrt: CUDA device {device_id} unusable ({exc})") from exc
        self.device = f"cuda:{device_id} {gpu.name}"
        engine_path, record = self._resolve_engine(gpu, str(trt.__version__), max_batch_size, engine_cache, precision)
        self.precision = record.precision
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._trt_logger)
        self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self._engine is None:
            raise BackendUnavailable(f"{engine_path}: TensorRT could not deserialise the engine (see the log above)")
        self._input, self._output = self._io_tensors(trt)
        lo, hi = self._profile_batch_range()
        self.batch_sizes = tuple(range(lo, min(hi, max_batch_size) + 1))
        if not self.batch_sizes:
            raise BackendUnavailable(
                f"{engine_path}: engine profile batch {lo}..{hi} excludes every size <= {max_batch_size}"
            )
        self._context = self._engine.create_execution_context()
        # The input buffer follows the engine's binding: float32 (or float16) rows, or uint8 NHWC pixels for a
        # bundle whose graph normalises its own input (written for TensorRT 10, not run here: no GPU).
        self._in_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self._input)))
        check_input_type(self._in_dtype.name, bundle, str(engine_path))
        self._out_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self._output)))
        spec = bundle.input
        self._in_per_image = 3 * spec.height * spec.width
        self._out_per_image = (4 + bundle.nc) * bundle.output.num_anchors
        n = self.batch_sizes[-1]
        self._in_buf = PinnedBuffer(self._cuda, n * self._in_per_image * self._in_dtype.itemsize)
        self._out_buf = PinnedBuffer(self._cuda, n * self._out_per_image * self._out_dtype.itemsize)
        self._context.set_tensor_address(self._input, self._in_buf.device_ptr)
        self._context.set_tensor_address(self._output, self._out_buf.device_ptr)
        logger.info(
            "TensorRT %s engine %s on %s, batch sizes %s", self.precision, engine_path, self.device, self.batch_sizes
        )

    def _resolve_engine(
        self, gpu: trt_build.GpuInfo, trt_version: str, max_batch_size: int, engine_cache: Path, precision: Precision
    ) -> tuple[Path, trt_build.BuildRecord]:
        """The bundle's engine when it fits this GPU, TensorRT and ``precision`` (auto takes the bundle's), else one
        built from the ONNX (or found in ``engine_cache``)."""
        bundle = self._bundle
        wanted: trt_build.Precision = bundle.engine.precision if bundle.engine else "fp16"
        if precision == "fp32" or precision == "fp16":
            wanted = precision
        elif precision != "auto":
            raise BackendUnavailable(f"TensorRT serves fp16 or fp32, not {precision}")
        if bundle.engine is not None and bundle.engine.precision != wanted:
            logger.info("bundle engine is %s, precision %s requested: building one", bundle.engine.precision, wanted)
        elif bundle.engine is not None:
            record_path = bundle.path(bundle.engine.build_record)
            try:
                record = trt_build.BuildRecord.load(record_path)
                trt_build.check_engine_compatible(
                    record, gpu_name=gpu.name, compute_capability=gpu.compute_capability, tensorrt_version=trt_version
                )
                return bundle.path(bundle.engine.file), record
            except (ValueError, trt_build.EngineMismatch) as exc:
                logger.warning("refusing the bundle's TensorRT engine %s: %s", bundle.path(bundle.engine.file), exc)
        top = max(1, min(max_batch_size, bundle.onnx.max_batch))
        profile = trt_build.BatchProfile(min=1, opt=top, max=top)
        try:
            path, record = trt_build.build_or_load_cached(
                bundle.path(bundle.onnx.file), engine_cache, profile=profile, precision=wanted
            )
        except trt_build.EngineBuildError as exc:
            raise BackendUnavailable(f"tensorrt: cannot build an engine from {bundle.onnx.file}: {exc}") from exc
        return Path(path), record

    def _io_tensors(self, trt: Any) -> tuple[str, str]:
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        want_in, want_out = self._bundle.input.name, self._bundle.output.name
        if want_in not in inputs or want_out not in outputs:
            raise BackendUnavailable(
                f"engine tensors (inputs {inputs}, outputs {outputs}) do not include bundle.json's "
                f"input {want_in!r} / output {want_out!r}"
            )
        return want_in, want_out

    def _profile_batch_range(self) -> tuple[int, int]:
        lo, _opt, hi = self._engine.get_tensor_profile_shape(self._input, 0)
        return max(1, int(lo[0])), int(hi[0])

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        n = int(batch.shape[0])
        if n not in self.batch_sizes:
            raise ValueError(f"batch size {n} is not served by this engine ({self.batch_sizes})")
        with self._lock:
            self._cuda.bind()  # the batcher's worker thread may differ from the constructing one
            host_in = self._in_buf.host_array(self._in_dtype, n * self._in_per_image)
            host_in[:] = batch.reshape(-1)
            if not self._context.set_input_shape(self._input, tuple(batch.shape)):
                raise RuntimeError(f"TensorRT rejected input shape {tuple(batch.shape)}")
            self._cuda.copy_to_device(self._in_buf, host_in.nbytes)
            if not self._context.execute_async_v3(self._cuda.stream_handle):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the log)")
            out_shape = tuple(self._context.get_tensor_shape(self._output))
            count = int(np.prod(out_shape))
            self._cuda.copy_to_host(self._out_buf, count * self._out_dtype.itemsize)
            self._cuda.synchronize()
            out = self._out_buf.host_array(self._out_dtype, count).reshape(out_shape).copy()
        return check_output(out, n, self._bundle)

    def warmup(self) -> dict[int, float]:
        return run_warmup(self, self._bundle)

    def close(self) -> None:
        with self._lock:
            self._cuda.bind()
            self._context = None
            self._engine = None
            self._in_buf.free()
            self._out_buf.free()
            self._cuda.close()
