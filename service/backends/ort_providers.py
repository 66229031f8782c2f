"""What the ONNX Runtime backends ask ONNX Runtime for: the model file and precision for a provider, the execution
provider list, and the TensorRT execution-provider options with their cache directories.

Pure functions (no onnxruntime import), so everything ORT receives is testable on a machine without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from service.backends.trt_build import BatchProfile, engine_cache_key
from service.core.bundle import OnnxSpec
from service.core.errors import BackendUnavailable

__all__ = [
    "EP_NAMES",
    "KIND_PROVIDER",
    "OnnxModelChoice",
    "Precision",
    "Provider",
    "ort_trt_cache_dirs",
    "provider_list",
    "select_onnx_model",
    "trt_provider_options",
]

Provider = Literal["cpu", "cuda", "tensorrt"]
Precision = Literal["auto", "fp32", "fp16", "int8"]

KIND_PROVIDER: dict[str, Provider] = {
    "onnxruntime-cpu": "cpu",
    "onnxruntime-cuda": "cuda",
    "onnxruntime-trt": "tensorrt",
}
EP_NAMES: dict[Provider, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


@dataclass(frozen=True)
class OnnxModelChoice:
    file: str  # bundle-relative ONNX file the session loads
    precision: Literal["fp32", "fp16", "int8"]  # what really computes (reported in /v1/model and aoi_model_info)
    reason: str


def select_onnx_model(onnx: OnnxSpec, provider: Provider, requested: Precision) -> OnnxModelChoice:
    """Pick the ONNX file and the precision for ``provider`` from the bundle's ``onnx`` section.

    - TensorRT provider: always the fp32 ONNX; TensorRT builds its own FP16 kernels (``trt_fp16_enable``) unless
      fp32 is requested. A converted FP16 graph would only add casts TensorRT cannot fold.
    - CUDA provider: ``auto`` uses ``onnx.fp16_file`` when the bundle has one (export measured and checked it).
    - CPU provider: ``auto`` serves the first of ``onnx.cpu_precisions`` (what export measured within its bound,
      fastest first: ``int8`` is ``onnx.int8_file``, static QDQ) and never FP16 (slower than fp32 on CPUs without
      native FP16 arithmetic); an explicit ``fp16`` or ``int8`` is honoured.
    - ``int8`` is a CPU precision: the CUDA and TensorRT providers refuse it.

    Raises:
        BackendUnavailable: ``fp16`` / ``int8`` requested and the bundle has no such ONNX, or ``int8`` on a GPU.
    """
    if requested == "int8":
        if provider != "cpu":
            raise BackendUnavailable(
                f"precision int8 is served on CPU (onnxruntime-cpu or openvino), not by the {provider} provider; "
                "set precision (AOI_PRECISION / --precision) to auto, fp16 or fp32"
            )
        if onnx.int8_file is None:
            raise BackendUnavailable(
                "precision int8 requested, but the bundle has no INT8 ONNX (bundle.json onnx.int8_file is not set); "
                "re-export with `aoi export --int8 --calibrate-data DIR` (or `--from-bundle`), or set precision "
                "(AOI_PRECISION / --precision) to auto or fp32"
            )
        return OnnxModelChoice(onnx.int8_file, "int8", f"int8 requested: {onnx.int8_file} (static QDQ)")
    if provider == "tensorrt":
        if requested == "fp32":
            return OnnxModelChoice(onnx.file, "fp32", "fp32 requested: TensorRT builds fp32 kernels")
        return OnnxModelChoice(onnx.file, "fp16", f"{requested}: TensorRT builds FP16 kernels from {onnx.file}")
    if requested == "fp32":
        return OnnxModelChoice(onnx.file, "fp32", "fp32 requested")
    if requested == "fp16":
        if onnx.fp16_file is None:
            raise BackendUnavailable(
                "precision fp16 requested, but the bundle has no FP16 ONNX (bundle.json onnx.fp16_file is not set); "
                "re-export with `aoi export --fp16-onnx`, or set precision (AOI_PRECISION / --precision) to auto or "
                "fp32"
            )
        note = " (usually slower than fp32 on CPU)" if provider == "cpu" else ""
        return OnnxModelChoice(onnx.fp16_file, "fp16", f"fp16 requested: {onnx.fp16_file}{note}")
    if provider == "cuda" and onnx.fp16_file is not None:
        return OnnxModelChoice(onnx.fp16_file, "fp16", f"auto: the bundle's FP16 ONNX {onnx.fp16_file} on CUDA")
    if provider == "cpu":
        measured = ", ".join(onnx.cpu_precisions)
        if onnx.cpu_precisions[0] == "int8" and onnx.int8_file is not None:
            return OnnxModelChoice(onnx.int8_file, "int8", f"auto: the bundle's INT8 ONNX {onnx.int8_file}, the "
                                   f"fastest of its measured CPU precisions ({measured}) within its bound")  # fmt: skip
        if onnx.int8_file is not None:
            return OnnxModelChoice(onnx.file, "fp32", f"auto: fp32, measured faster than the bundle's INT8 ONNX "
                                   f"({measured})")  # fmt: skip
        if onnx.fp16_file is not None:
            return OnnxModelChoice(onnx.file, "fp32", "auto: fp32 on CPU (FP16 is slower there)")
    return OnnxModelChoice(onnx.file, "fp32", "auto: fp32 (the bundle has no FP16 ONNX)")


def trt_provider_options(
    *,
    device_id: int,
    input_name: str,
    input_chw: tuple[int, int, int],
    profile: BatchProfile | None,
    fp16: bool,
    engine_dir: Path,
    timing_dir: Path,
) -> dict[str, Any]:
    """Options of ONNX Runtime's ``TensorrtExecutionProvider``.

    ``profile`` is the one optimisation profile over the batch axis (None for a model with a fixed batch, which needs
    none); spatial dims are the bundle's (``input_chw``). Engines are cached in ``engine_dir``, tactic timings in
    ``timing_dir`` (shared by models on the same GPU + TensorRT).
    """
    opts: dict[str, Any] = {
        "device_id": device_id,
        "trt_fp16_enable": fp16,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(engine_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(timing_dir),
    }
    if profile is not None:
        for which, shape in zip(("min", "opt", "max"), profile.shapes(input_chw), strict=True):
            opts[f"trt_profile_{which}_shapes"] = f"{input_name}:" + "x".join(str(d) for d in shape)
    return opts


def provider_list(
    provider: Provider, *, device_id: int, trt_options: dict[str, Any] | None = None
) -> list[str | tuple[str, dict[str, Any]]]:
    """Providers in ONNX Runtime's priority order. The TensorRT provider is followed by CUDA (nodes TensorRT does not
    take run there, not on the CPU) and every list ends with CPU, which ORT requires as the last resort."""
    cuda: tuple[str, dict[str, Any]] = (EP_NAMES["cuda"], {"device_id": device_id})
    if provider == "tensorrt":
        return [(EP_NAMES["tensorrt"], dict(trt_options or {"device_id": device_id})), cuda, EP_NAMES["cpu"]]
    if provider == "cuda":
        return [cuda, EP_NAMES["cpu"]]
    return [EP_NAMES["cpu"]]


def ort_trt_cache_dirs(
    root: Path,
    *,
    onnx_sha256: str,
    gpu_name: str,
    compute_capability: str,
    runtime_version: str,
    profile: BatchProfile,
    fp16: bool,
) -> tuple[Path, Path]:
    """(engine dir, timing-cache dir) under the service's ``engine_cache`` for the ORT TensorRT provider.

    ONNX Runtime names its cached engines after the graph and compute capability only and asks users to clear the
    cache when the model, ONNX Runtime, TensorRT or GPU changes; keying the directory by all of them (the key of the
    native backend's cache, with ``runtime_version`` = ONNX Runtime + TensorRT versions) does that automatically.
    """
    precision = "fp16" if fp16 else "fp32"
    key = engine_cache_key(onnx_sha256, gpu_name, compute_capability, runtime_version, profile, precision)
    timing = engine_cache_key("timing", gpu_name, compute_capability, runtime_version, BatchProfile(1, 1, 1), "any")
    base = root / "ort-trt"
    return base / key, base / f"timing-{timing[:16]}"
