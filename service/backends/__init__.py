"""Inference backends behind one protocol. :func:`load_backend` imports the chosen runtime module lazily, so
tensorrt / CUDA libraries load only when selected."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from service.backends.base import InferenceBackend
from service.bundle import ModelBundle
from service.errors import BackendUnavailable

__all__ = ["BackendChoice", "BackendUnavailable", "InferenceBackend", "load_backend", "unavailable_reasons"]

logger = logging.getLogger(__name__)
_AUTO_ORDER = ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")


@dataclass(frozen=True)
class BackendChoice:
    backend: InferenceBackend
    reason: str  # why this backend: requested, or what auto skipped and why


def _load_one(
    kind: str, bundle: ModelBundle, *, device_id: int, max_batch_size: int, intra_op_threads: int, engine_cache: Path
) -> InferenceBackend:
    if kind == "tensorrt":
        from service.backends.trt_backend import TrtBackend

        return TrtBackend(bundle, device_id=device_id, max_batch_size=max_batch_size, engine_cache=engine_cache)
    if kind in ("onnxruntime-cuda", "onnxruntime-cpu"):
        from service.backends.ort_backend import OrtBackend

        return OrtBackend(
            bundle,
            cuda=kind == "onnxruntime-cuda",
            device_id=device_id,
            max_batch_size=max_batch_size,
            intra_op_threads=intra_op_threads,
        )
    raise BackendUnavailable(f"unknown backend {kind!r}; choose auto, tensorrt, onnxruntime-cuda or onnxruntime-cpu")


def unavailable_reasons() -> dict[str, str | None]:
    """For each backend kind, None when it can run here, else why not (cheap: loads no model)."""
    from service.backends.ort_backend import ort_cuda_unavailable_reason
    from service.backends.trt_backend import trt_unavailable_reason

    try:
        import onnxruntime  # noqa: F401

        cpu: str | None = None
    except ImportError as exc:
        cpu = f"onnxruntime is not installed ({exc})"
    return {
        "tensorrt": trt_unavailable_reason(),
        "onnxruntime-cuda": ort_cuda_unavailable_reason(),
        "onnxruntime-cpu": cpu,
    }


def load_backend(
    kind: str,
    bundle: ModelBundle,
    *,
    device_id: int = 0,
    max_batch_size: int = 8,
    intra_op_threads: int = 0,
    engine_cache: Path = Path("engine-cache"),
) -> BackendChoice:
    """Load ``kind`` (auto | tensorrt | onnxruntime-cuda | onnxruntime-cpu) for ``bundle``.

    ``auto`` tries TensorRT, then ONNX Runtime CUDA, then CPU, and logs every skipped backend with its reason (a CUDA
    fallback of ONNX Runtime is logged as a WARNING, never hidden).

    Raises:
        BackendUnavailable: the requested backend (or, for auto, every backend) cannot run here; says why.
    """

    def one(k: str) -> InferenceBackend:
        return _load_one(
            k,
            bundle,
            device_id=device_id,
            max_batch_size=max_batch_size,
            intra_op_threads=intra_op_threads,
            engine_cache=engine_cache,
        )

    if kind != "auto":
        return BackendChoice(one(kind), f"{kind} requested")
    skipped: list[str] = []
    for candidate in _AUTO_ORDER:
        try:
            backend = one(candidate)
        except BackendUnavailable as exc:
            level = logging.WARNING if "fell back" in str(exc) else logging.INFO
            logger.log(level, "backend auto: skipping %s: %s", candidate, exc)
            skipped.append(f"{candidate}: {exc}")
            continue
        reason = f"auto: {candidate} is the best available" + (f" (skipped {'; '.join(skipped)})" if skipped else "")
        logger.info("backend auto picked %s on %s", candidate, backend.device)
        return BackendChoice(backend, reason)
    raise BackendUnavailable("no backend can run here: " + "; ".join(skipped))
