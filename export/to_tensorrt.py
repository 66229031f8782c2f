"""Bundle ONNX -> TensorRT FP16 engine (``model.engine`` + ``engine.json``), and a runner for its parity check.

The build itself lives in ``service.backends.trt_build`` so the service can rebuild on the target GPU with the same
code. Written against the TensorRT 10 Python API (named tensors, ``execute_async_v3``); device buffers come from
torch CUDA tensors because export already depends on torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from service.backends.trt_build import BatchProfile, BuildRecord, build_engine

__all__ = ["ENGINE_FILE", "RECORD_FILE", "EngineBuild", "TrtRunner", "build_bundle_engine"]

ENGINE_FILE = "model.engine"
RECORD_FILE = "engine.json"


@dataclass(frozen=True)
class EngineBuild:
    engine_path: Path
    record_path: Path
    record: BuildRecord


def build_bundle_engine(
    onnx_path: Path,
    out_dir: Path,
    *,
    profile: BatchProfile,
    timing_cache: Path | None,
    workspace_mib: int = 2048,
) -> EngineBuild:
    """Build the FP16 engine for ``onnx_path`` and write it with its build record into ``out_dir``."""
    data, record = build_engine(
        onnx_path, profile=profile, precision="fp16", timing_cache=timing_cache, workspace_mib=workspace_mib
    )
    engine_path, record_path = out_dir / ENGINE_FILE, out_dir / RECORD_FILE
    engine_path.write_bytes(data)
    record.save(record_path)
    return EngineBuild(engine_path, record_path, record)


class TrtRunner:
    """Runs a serialized engine on CUDA device 0; float32 in and out (FP16 is internal to the engine)."""

    def __init__(self, engine_path: Path, profile: BatchProfile) -> None:
        import tensorrt as trt
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("TensorRT parity needs torch with CUDA for device buffers (torch.cuda is unavailable)")
        self._torch: Any = torch
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._trt_logger)
        self.engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{engine_path}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise RuntimeError(f"{engine_path}: expected one input and one output, got {inputs} / {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.profile = profile
        self.name = "tensorrt fp16"

    def __call__(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        torch = self._torch
        if not self.profile.covers(x.shape[0]):
            raise ValueError(f"batch {x.shape[0]} outside the engine profile {self.profile}")
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).cuda()
        self.context.set_input_shape(self.input_name, tuple(xt.shape))
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        out = torch.empty(out_shape, dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(self.input_name, xt.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        stream.synchronize()
        return np.asarray(out.cpu().numpy(), dtype=np.float32)
