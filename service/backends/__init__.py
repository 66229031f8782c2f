"""Inference backends behind one protocol (:class:`service.core.backend.InferenceBackend`). :func:`load_backend`
imports the chosen runtime module lazily, so tensorrt / CUDA libraries load only when selected. May import settings
and core."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

from service.backends.base import backend_max_instances
from service.backends.ort_providers import KIND_PROVIDER, Precision
from service.core.backend import InferenceBackend
from service.core.bundle import ModelBundle
from service.core.errors import BackendUnavailable

if TYPE_CHECKING:
    from service.settings import Settings

__all__ = [
    "AUTO_ORDER",
    "CPU_KINDS",
    "BackendChoice",
    "BackendUnavailable",
    "InferenceBackend",
    "auto_candidates",
    "backend_from_settings",
    "cgroup_cpu_quota",
    "cpu_cores",
    "instances_for",
    "load_backend",
    "resolve_instances",
    "unavailable_reasons",
]

logger = logging.getLogger(__name__)
# On a CPU, auto follows the bundle's measured cpu_ranking (auto_candidates); this order is what is left after it, and
# all there is for a bundle without one: ONNX Runtime CPU before OpenVINO (their fp32 speeds are within noise of each
# other: docs/measurements.md, M2).
AUTO_ORDER = ("tensorrt", "onnxruntime-trt", "onnxruntime-cuda", "onnxruntime-cpu", "openvino")
CPU_KINDS = ("onnxruntime-cpu", "openvino")  # the backends that run on the host CPU
_CPU_ONLY = {"bf16": ("openvino",), "int8": ("onnxruntime-cpu", "openvino")}  # precision -> the backends serving it


@dataclass(frozen=True)
class BackendChoice:
    backend: InferenceBackend
    reason: str  # why this backend: requested, or what auto skipped and why; plus the precision choice
    instances: int = 1  # batches the service runs on this backend at once (its inference threads)


def cpu_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use, at least 1: its affinity mask (e.g. a container's cpuset), lowered to its cgroup CPU
    quota rounded up (``docker run --cpus 2`` on a 16-core host: 2)."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        cores = max(1, os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root)
    return min(cores, quota) if quota is not None else cores


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The cgroup CPU quota in whole CPUs (rounded up), or None when there is none or it cannot be read.
    cgroup v2 ``cpu.max`` ("max 100000" or "<quota> <period>"), else v1 ``cpu/cpu.cfs_quota_us`` (-1 = none)."""
    try:
        fields = (root / "cpu.max").read_text().split()
    except OSError:
        try:
            fields = [(root / "cpu" / name).read_text().strip() for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us")]
        except OSError:
            return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except (ValueError, IndexError):  # "max", or something unexpected: no usable quota
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, -(-quota // period))


def resolve_instances(kind: str, requested: int, cores: int | None = None) -> int:
    """Model instances (batches in flight at once) for a backend kind; ``requested`` 0 means auto.

    Auto: on the CPU backends (``onnxruntime-cpu``, ``openvino``), 2 when there are at least 2 cores (each instance
    then gets half the cores as its ONNX Runtime intra-op threads or OpenVINO stream: small detectors scale poorly
    across threads, and two batches on one core each keep both cores busy while the other is between batches), else
    1; on GPU backends 1 (the GPU already runs a batch in parallel; raise it to overlap host work with GPU work).
    """
    if requested > 0:
        return requested
    if kind in CPU_KINDS:
        return 2 if (cores if cores is not None else cpu_cores()) >= 2 else 1
    return 1


@dataclass(frozen=True)
class _LoadOptions:
    device_id: int
    max_batch_size: int
    intra_op_threads: int
    engine_cache: Path
    precision: str
    instances: int
    openvino_cache: Path | None = None  # None: <engine_cache>/openvino


def _load_openvino(bundle: ModelBundle, o: _LoadOptions) -> InferenceBackend:
    from service.backends.openvino_backend import OpenVinoBackend

    streams = min(resolve_instances("openvino", o.instances), OpenVinoBackend.MAX_STREAMS)
    return OpenVinoBackend(
        bundle,
        precision=o.precision,
        max_batch_size=o.max_batch_size,
        streams=streams,
        threads=o.intra_op_threads or max(streams, cpu_cores()),  # the streams share the cores
        cache_root=o.openvino_cache or o.engine_cache / "openvino",
    )


def _load_one(kind: str, bundle: ModelBundle, o: _LoadOptions) -> InferenceBackend:
    if kind not in _CPU_ONLY.get(o.precision, (kind,)):
        serving = " or ".join(_CPU_ONLY[o.precision])
        raise BackendUnavailable(
            f"{kind} does not serve precision {o.precision} (only {serving} does); set backend (AOI_BACKEND) to "
            f"{serving} or auto, or precision (AOI_PRECISION) to auto or fp32"
        )
    if kind == "openvino":
        return _load_openvino(bundle, o)
    if kind == "tensorrt":
        from service.backends.trt_backend import TrtBackend

        return TrtBackend(
            bundle,
            device_id=o.device_id,
            max_batch_size=o.max_batch_size,
            engine_cache=o.engine_cache,
            precision=cast(Precision, o.precision),
        )
    if kind in KIND_PROVIDER:
        from service.backends.ort_backend import OrtBackend

        sessions = min(resolve_instances(kind, o.instances), OrtBackend.MAX_SESSIONS)
        threads = o.intra_op_threads
        if kind == "onnxruntime-cpu" and threads == 0:  # split the cores between the instances' sessions
            threads = max(1, cpu_cores() // sessions)
        return OrtBackend(
            bundle,
            provider=KIND_PROVIDER[kind],
            device_id=o.device_id,
            max_batch_size=o.max_batch_size,
            intra_op_threads=threads,
            precision=cast(Precision, o.precision),
            engine_cache=o.engine_cache,
            sessions=sessions,
        )
    raise BackendUnavailable(f"unknown backend {kind!r}; choose auto, {', '.join(AUTO_ORDER)}")


def unavailable_reasons() -> dict[str, str | None]:
    """For each backend kind, None when it can run here, else why not (cheap: loads no model)."""
    from service.backends.openvino_backend import openvino_unavailable_reason
    from service.backends.ort_backend import ort_cuda_unavailable_reason, ort_trt_unavailable_reason
    from service.backends.trt_build import tensorrt_unavailable_reason

    try:
        import onnxruntime  # noqa: F401

        cpu: str | None = None
    except ImportError as exc:
        cpu = f"onnxruntime is not installed ({exc})"
    return {
        "tensorrt": tensorrt_unavailable_reason(),
        "onnxruntime-trt": ort_trt_unavailable_reason(),
        "onnxruntime-cuda": ort_cuda_unavailable_reason(),
        "onnxruntime-cpu": cpu,
        "openvino": openvino_unavailable_reason(),
    }


def _with_precision(reason: str, backend: InferenceBackend) -> str:
    choice = getattr(backend, "choice", None)  # ONNX Runtime / OpenVINO backends say which file they chose and why
    detail = getattr(choice, "reason", None)
    return f"{reason}; precision {backend.precision}" + (f" ({detail})" if detail else "")


def instances_for(kind: str, requested: int, backend: InferenceBackend) -> int:
    """:func:`resolve_instances`, capped by what the loaded backend allows (:func:`backend_max_instances`)."""
    n = resolve_instances(kind, requested)
    cap = backend_max_instances(backend)
    if n > cap:
        logger.warning("%s runs at most %d batch(es) at once here; instances %d -> %d", kind, cap, n, cap)
    return min(n, cap)


def load_backend(
    kind: str,
    bundle: ModelBundle,
    *,
    device_id: int = 0,
    max_batch_size: int = 8,
    intra_op_threads: int = 0,
    engine_cache: Path = Path("engine-cache"),
    precision: str = "auto",
    instances: int = 0,
    openvino_cache: Path | None = None,
) -> BackendChoice:
    """Load ``kind`` (auto | tensorrt | onnxruntime-trt | onnxruntime-cuda | openvino | onnxruntime-cpu) for
    ``bundle``.

    ``auto`` tries them in that order (:data:`AUTO_ORDER`) and logs every skipped backend with its reason (a provider
    fallback of ONNX Runtime is logged as a WARNING, never hidden). ``precision`` (auto | fp32 | fp16 | bf16 | int8)
    is passed to the backend: TensorRT builds FP16 kernels itself, ONNX Runtime CUDA/CPU use the bundle's
    ``onnx.fp16_file`` and ONNX Runtime CPU its ``onnx.int8_file``, OpenVINO sets its precision hint or loads the
    bundle's INT8 IR (bf16 is OpenVINO's only, int8 is served on CPU only). ``openvino_cache`` is the root of
    OpenVINO's compiled-model cache (None: ``engine_cache/openvino``).
    ``instances`` (0 = auto, :func:`resolve_instances`) is how many batches the service will run at once; it is
    capped by what the backend allows, and on ONNX Runtime CPU with ``intra_op_threads`` 0 it splits the cores.

    Raises:
        BackendUnavailable: the requested backend (or, for auto, every backend) cannot run here; says why.
    """
    opts = _LoadOptions(device_id, max_batch_size, intra_op_threads, engine_cache, precision, instances, openvino_cache)
    if kind != "auto":
        backend = _load_one(kind, bundle, opts)
        return BackendChoice(
            backend, _with_precision(f"{kind} requested", backend), instances_for(kind, instances, backend)
        )
    skipped: list[str] = []
    for candidate, wanted, why in auto_candidates(bundle, precision):
        label = candidate if wanted == precision else f"{candidate} {wanted}"
        try:
            backend = _load_one(candidate, bundle, replace(opts, precision=wanted))
        except BackendUnavailable as exc:
            level = logging.WARNING if "fell back" in str(exc) else logging.INFO
            logger.log(level, "backend auto: skipping %s: %s", label, exc)
            skipped.append(f"{label}: {exc}")
            continue
        reason = f"auto: {label}, {why}" + (f" (skipped {'; '.join(skipped)})" if skipped else "")
        logger.info("backend auto picked %s on %s (%s)", candidate, backend.device, backend.precision)
        return BackendChoice(backend, _with_precision(reason, backend), instances_for(candidate, instances, backend))
    raise BackendUnavailable("no backend can run here: " + "; ".join(skipped))


def auto_candidates(bundle: ModelBundle, precision: str) -> list[tuple[str, str, str]]:
    """What ``backend: auto`` tries, in order, as (backend, precision, why): the GPU backends first (their own
    precision choice), then the bundle's ``cpu_ranking`` (every CPU runtime and precision export measured within its
    bound, fastest first; only entries of the requested precision unless it is auto), then ONNX Runtime CPU and
    OpenVINO with the requested precision (bundles without a ranking, or when no ranked entry runs here)."""
    gpu = [(k, precision, "the best available") for k in AUTO_ORDER if k not in CPU_KINDS]
    ranked = [(c.backend, c.precision, f"#{i + 1} of the bundle's measured cpu_ranking")
              for i, c in enumerate(bundle.cpu_ranking) if precision in ("auto", c.precision)]  # fmt: skip
    rest = [(k, precision, "the best available CPU runtime") for k in AUTO_ORDER if k in CPU_KINDS]
    return gpu + ranked + rest


def backend_from_settings(settings: Settings, bundle: ModelBundle) -> BackendChoice:
    """:func:`load_backend` with the deployment knobs of ``settings`` (backend kind, device, batch size, threads,
    instances, engine and OpenVINO caches, precision): the one place the service, ``aoi serve`` and the benchmark
    load it from.

    Raises:
        BackendUnavailable: as :func:`load_backend`.
    """
    return load_backend(
        settings.backend,
        bundle,
        device_id=settings.device_id,
        max_batch_size=settings.max_batch_size,
        intra_op_threads=settings.intra_op_threads,
        instances=settings.instances,
        engine_cache=settings.engine_cache,
        precision=settings.precision,
        openvino_cache=settings.openvino_cache,
    )
