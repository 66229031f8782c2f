"""Inference backends behind one protocol. :func:`load_backend` imports the chosen runtime module lazily, so
tensorrt / CUDA libraries load only when selected."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from service.backends.base import InferenceBackend
from service.backends.ort_providers import KIND_PROVIDER, Precision
from service.bundle import ModelBundle
from service.errors import BackendUnavailable

__all__ = [
    "AUTO_ORDER",
    "BackendChoice",
    "BackendUnavailable",
    "InferenceBackend",
    "load_backend",
    "unavailable_reasons",
]

logger = logging.getLogger(__name__)
AUTO_ORDER = ("tensorrt", "onnxruntime-trt", "onnxruntime-cuda", "onnxruntime-cpu")


@dataclass(frozen=True)
class BackendChoice:
    backend: InferenceBackend
    reason: str  # why this backend: requested, or what auto skipped and why; plus the precision choice


@dataclass(frozen=True)
class _LoadOptions:
    device_id: int
    max_batch_size: int
    intra_op_threads: int
    engine_cache: Path
    precision: Precision


def _load_one(kind: str, bundle: ModelBundle, o: _LoadOptions) -> InferenceBackend:
    if kind == "tensorrt":
        from service.backends.trt_backend import TrtBackend

        return TrtBackend(
            bundle,
            device_id=o.device_id,
            max_batch_size=o.max_batch_size,
            engine_cache=o.engine_cache,
            precision=o.precision,
        )
    if kind in KIND_PROVIDER:
        from service.backends.ort_backend import OrtBackend

        return OrtBackend(
            bundle,
            provider=KIND_PROVIDER[kind],
            device_id=o.device_id,
            max_batch_size=o.max_batch_size,
            intra_op_threads=o.intra_op_threads,
            precision=o.precision,
            engine_cache=o.engine_cache,
        )
    raise BackendUnavailable(f"unknown backend {kind!r}; choose auto, {', '.join(AUTO_ORDER)}")


def unavailable_reasons() -> dict[str, str | None]:
    """For each backend kind, None when it can run here, else why not (cheap: loads no model)."""
    from service.backends.ort_backend import ort_cuda_unavailable_reason, ort_trt_unavailable_reason
    from service.backends.trt_backend import trt_unavailable_reason

    try:
        import onnxruntime  # noqa: F401

        cpu: str | None = None
    except ImportError as exc:
        cpu = f"onnxruntime is not installed ({exc})"
    return {
        "tensorrt": trt_unavailable_reason(),
        "onnxruntime-trt": ort_trt_unavailable_reason(),
        "onnxruntime-cuda": ort_cuda_unavailable_reason(),
        "onnxruntime-cpu": cpu,
    }


def _with_precision(reason: str, backend: InferenceBackend) -> str:
    choice = getattr(backend, "choice", None)  # ONNX Runtime backends say which ONNX file they chose and why
    detail = getattr(choice, "reason", None)
    return f"{reason}; precision {backend.precision}" + (f" ({detail})" if detail else "")


def load_backend(
    kind: str,
    bundle: ModelBundle,
    *,
    device_id: int = 0,
    max_batch_size: int = 8,
    intra_op_threads: int = 0,
    engine_cache: Path = Path("engine-cache"),
    precision: Precision = "auto",
) -> BackendChoice:
    """Load ``kind`` (auto | tensorrt | onnxruntime-trt | onnxruntime-cuda | onnxruntime-cpu) for ``bundle``.

    ``auto`` tries them in that order (:data:`AUTO_ORDER`) and logs every skipped backend with its reason (a provider
    fallback of ONNX Runtime is logged as a WARNING, never hidden). ``precision`` (auto | fp32 | fp16) is passed to
    the backend: TensorRT builds FP16 kernels itself, ONNX Runtime CUDA/CPU use the bundle's ``onnx.fp16_file``.

    Raises:
        BackendUnavailable: the requested backend (or, for auto, every backend) cannot run here; says why.
    """
    opts = _LoadOptions(device_id, max_batch_size, intra_op_threads, engine_cache, precision)
    if kind != "auto":
        backend = _load_one(kind, bundle, opts)
        return BackendChoice(backend, _with_precision(f"{kind} requested", backend))
    skipped: list[str] = []
    for candidate in AUTO_ORDER:
        try:
            backend = _load_one(candidate, bundle, opts)
        except BackendUnavailable as exc:
            level = logging.WARNING if "fell back" in str(exc) else logging.INFO
            logger.log(level, "backend auto: skipping %s: %s", candidate, exc)
            skipped.append(f"{candidate}: {exc}")
            continue
        reason = f"auto: {candidate} is the best available" + (f" (skipped {'; '.join(skipped)})" if skipped else "")
        logger.info("backend auto picked %s on %s (%s)", candidate, backend.device, backend.precision)
        return BackendChoice(backend, _with_precision(reason, backend))
    raise BackendUnavailable("no backend can run here: " + "; ".join(skipped))
