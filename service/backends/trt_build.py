"""TensorRT 10 engine build from a bundle's ONNX, plus the build record and cache rules that make engines reusable.

Engines are specific to a GPU (compute capability) and a TensorRT version, so every engine travels with a
:class:`BuildRecord` and is cached under a key of GPU + TensorRT version + ONNX sha256 + profile + precision.
Used by ``aoi export --engine`` and by the service's TensorRT backend (build at first start on the target GPU).
Torch-free; ``tensorrt`` is imported only inside the functions that need it.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from service.core.bundle import sha256_file

__all__ = [
    "BatchProfile",
    "BuildRecord",
    "EngineBuildError",
    "EngineMismatch",
    "GpuInfo",
    "build_engine",
    "build_or_load_cached",
    "cached_engine_paths",
    "check_engine_compatible",
    "engine_cache_key",
    "query_gpu",
    "tensorrt_unavailable_reason",
]

logger = logging.getLogger(__name__)

Precision = Literal["fp16", "fp32"]
_RECORD_FORMAT = "aoi-trt-build-record"


class EngineMismatch(Exception):
    """A serialized engine was built for another GPU or TensorRT version and must be rebuilt."""


class EngineBuildError(Exception):
    """TensorRT is unavailable, the ONNX does not parse, or the builder returned no engine."""


@dataclass(frozen=True)
class BatchProfile:
    """Optimisation profile over the batch axis; the spatial dims are fixed by the bundle's input spec.

    ``opt`` is the batch TensorRT tunes its kernels for: set it to the typical served batch, not to ``max``.
    """

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(
                f"batch profile needs 1 <= min <= opt <= max, got min={self.min} opt={self.opt} max={self.max}"
            )

    def shapes(self, chw: tuple[int, int, int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) NCHW shapes for ``IOptimizationProfile.set_shape``."""
        return (self.min, *chw), (self.opt, *chw), (self.max, *chw)

    def covers(self, batch: int) -> bool:
        return self.min <= batch <= self.max

    def to_json(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}

    @classmethod
    def from_json(cls, d: Any) -> BatchProfile:
        if not isinstance(d, dict) or any(not isinstance(d.get(k), int) for k in ("min", "opt", "max")):
            raise ValueError(f"profile must be an object with integer min/opt/max, got {d!r}")
        return cls(min=d["min"], opt=d["opt"], max=d["max"])


@dataclass(frozen=True)
class BuildRecord:
    """What an engine was built from and for; stored next to the engine as JSON (``engine.json`` in a bundle)."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "major.minor", e.g. "8.9"
    precision: str
    profiles: list[BatchProfile]
    onnx_sha256: str
    input_name: str
    input_shape_chw: tuple[int, int, int]
    built_at: str
    extra: dict[str, Any] = field(default_factory=dict)  # build options (workspace, timing cache hit), informational

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _RECORD_FORMAT,
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
            "precision": self.precision,
            "profiles": [p.to_json() for p in self.profiles],
            "onnx_sha256": self.onnx_sha256,
            "input_name": self.input_name,
            "input_shape_chw": list(self.input_shape_chw),
            "built_at": self.built_at,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, d: Any) -> BuildRecord:
        """Parse :meth:`to_json` output. Raises ``ValueError`` naming the bad field."""
        if not isinstance(d, dict):
            raise ValueError("build record must be a JSON object")
        if d.get("format", _RECORD_FORMAT) != _RECORD_FORMAT:
            raise ValueError(f"format: expected {_RECORD_FORMAT!r}, got {d.get('format')!r}")
        strings = ("tensorrt_version", "gpu_name", "compute_capability", "precision", "onnx_sha256", "input_name")
        for key in (*strings, "built_at"):
            if not isinstance(d.get(key), str):
                raise ValueError(f"{key}: missing or not a string")
        profiles = d.get("profiles")
        if not isinstance(profiles, list) or not profiles:
            raise ValueError("profiles: must be a non-empty list")
        chw = d.get("input_shape_chw")
        if not isinstance(chw, list | tuple) or len(chw) != 3 or not all(isinstance(v, int) and v > 0 for v in chw):
            raise ValueError(f"input_shape_chw: must be three positive integers, got {chw!r}")
        extra = d.get("extra", {})
        if not isinstance(extra, dict):
            raise ValueError("extra: must be an object")
        try:
            parsed = [BatchProfile.from_json(p) for p in profiles]
        except ValueError as exc:
            raise ValueError(f"profiles: {exc}") from exc
        return cls(
            tensorrt_version=d["tensorrt_version"],
            gpu_name=d["gpu_name"],
            compute_capability=d["compute_capability"],
            precision=d["precision"],
            profiles=parsed,
            onnx_sha256=d["onnx_sha256"],
            input_name=d["input_name"],
            input_shape_chw=(int(chw[0]), int(chw[1]), int(chw[2])),
            built_at=d["built_at"],
            extra=extra,
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> BuildRecord:
        """Read a record file. Raises ``ValueError`` with the path and the problem."""
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
            raise ValueError(f"{path}: invalid TensorRT build record ({exc})") from exc


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str


def engine_cache_key(
    onnx_sha256: str,
    gpu_name: str,
    compute_capability: str,
    tensorrt_version: str,
    profile: BatchProfile,
    precision: str,
) -> str:
    """Stable 24-hex-digit key: equal inputs give equal keys across processes; any change gives a new key."""
    payload = json.dumps(
        {
            "onnx": onnx_sha256,
            "gpu": gpu_name.strip(),
            "cc": compute_capability,
            "trt": tensorrt_version,
            "profile": profile.to_json(),
            "precision": precision,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


def check_engine_compatible(
    record: BuildRecord, *, gpu_name: str, compute_capability: str, tensorrt_version: str
) -> None:
    """Raise :class:`EngineMismatch` when the engine in ``record`` cannot run here.

    TensorRT engines are not portable across TensorRT versions (we require the exact version, as the runtime does
    without version-compatible builds) nor across compute capabilities. A different GPU name with the same compute
    capability deserialises, but the tactics were timed on another card, so it is also refused: rebuild instead.
    """
    problems = []
    if record.tensorrt_version != tensorrt_version:
        problems.append(f"TensorRT {record.tensorrt_version} (engine) != {tensorrt_version} (here)")
    if record.compute_capability != compute_capability:
        problems.append(f"compute capability {record.compute_capability} (engine) != {compute_capability} (here)")
    if record.gpu_name.strip() != gpu_name.strip():
        problems.append(f"GPU {record.gpu_name!r} (engine) != {gpu_name!r} (here)")
    if problems:
        raise EngineMismatch("engine was built elsewhere: " + "; ".join(problems) + "; rebuild it from the ONNX")


def _cuda_driver() -> ctypes.CDLL:
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError("CUDA driver library (libcuda) not found")


def query_gpu(device: int = 0) -> GpuInfo:
    """Name and compute capability of CUDA device ``device`` through the driver API (no torch, no nvidia-smi).

    Raises:
        OSError: no CUDA driver, or no such device.
    """
    cuda = _cuda_driver()
    if cuda.cuInit(0) != 0:
        raise OSError("cuInit failed: no usable CUDA device")
    handle = ctypes.c_int()
    if cuda.cuDeviceGet(ctypes.byref(handle), device) != 0:
        raise OSError(f"CUDA device {device} not found")
    buf = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(buf, 256, handle)
    major, minor = ctypes.c_int(), ctypes.c_int()
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, handle)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, handle)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
    return GpuInfo(name=buf.value.decode(errors="replace"), compute_capability=f"{major.value}.{minor.value}")


def tensorrt_unavailable_reason() -> str | None:
    """None when ``tensorrt`` imports and a CUDA GPU is visible, else a sentence saying what is missing."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"TensorRT is not installed ({exc}); install the gpu extra: pip install -e '.[gpu]' on a CUDA machine"
    try:
        query_gpu()
    except OSError as exc:
        return f"no CUDA GPU visible ({exc})"
    return None


def _import_tensorrt() -> Any:
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise EngineBuildError(reason)
    import tensorrt as trt

    return trt


def _parse_onnx(trt: Any, builder: Any, onnx_path: Path, trt_logger: Any) -> Any:
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode, flags = 0
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{onnx_path}: TensorRT ONNX parser failed: {errors}")
    if network.num_inputs != 1:
        raise EngineBuildError(f"{onnx_path}: expected one network input, found {network.num_inputs}")
    return network


def build_engine(
    onnx_path: Path,
    *,
    profile: BatchProfile,
    precision: Precision = "fp16",
    timing_cache: Path | None = None,
    workspace_mib: int = 2048,
) -> tuple[bytes, BuildRecord]:
    """Build a serialized TensorRT 10 engine from an ONNX with a dynamic batch axis.

    Args:
        onnx_path: ONNX whose single input is ``[B, C, H, W]`` with dynamic B and fixed C, H, W.
        profile: batch optimisation profile (one profile; the service picks batches inside it).
        precision: "fp16" sets ``BuilderFlag.FP16`` (TensorRT still keeps layers in fp32 where it is faster/needed).
        timing_cache: file reused between builds (read if present, updated after the build); saves most of the
            tactic timing on rebuilds for the same GPU + TensorRT version.
        workspace_mib: builder workspace memory pool limit.

    Raises:
        EngineBuildError: TensorRT/GPU missing, unparsable ONNX, non-dynamic batch or a failed build.
    """
    trt = _import_tensorrt()
    gpu = query_gpu()
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = _parse_onnx(trt, builder, onnx_path, trt_logger)
    inp = network.get_input(0)
    shape = tuple(int(d) for d in inp.shape)
    if len(shape) != 4 or shape[0] != -1 or min(shape[1:]) <= 0:
        raise EngineBuildError(f"{onnx_path}: input {inp.name} must be [-1, C, H, W] (dynamic batch), got {shape}")
    chw = (shape[1], shape[2], shape[3])

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(inp.name, *profile.shapes(chw))
    config.add_optimization_profile(opt_profile)

    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{onnx_path}: TensorRT builder returned no engine (see the TensorRT log above)")
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(timing_cache, bytes(config.get_timing_cache().serialize()))
    record = BuildRecord(
        tensorrt_version=str(trt.__version__),
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        precision=precision,
        profiles=[profile],
        onnx_sha256=sha256_file(onnx_path),
        input_name=str(inp.name),
        input_shape_chw=chw,
        built_at=datetime.now(UTC).isoformat(timespec="seconds"),
        extra={"workspace_mib": workspace_mib, "timing_cache_reused": bool(cache_bytes)},
    )
    return bytes(serialized), record


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file + rename, so two services starting together never read half an engine."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_engine_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    """(engine file, build record file) for a cache key."""
    return cache_dir / f"{key}.engine", cache_dir / f"{key}.json"


def build_or_load_cached(
    onnx_path: Path, cache_dir: Path, *, profile: BatchProfile, precision: Precision = "fp16"
) -> tuple[Path, BuildRecord]:
    """Return a compatible engine for this GPU from ``cache_dir``, building (and caching) it on a miss.

    The key covers ONNX sha256 + GPU + compute capability + TensorRT version + profile + precision, so a new model,
    GPU or TensorRT upgrade never reuses a stale engine. The timing cache in ``cache_dir`` is shared by builds on the
    same GPU + TensorRT version.
    """
    trt = _import_tensorrt()
    gpu = query_gpu()
    version = str(trt.__version__)
    key = engine_cache_key(sha256_file(onnx_path), gpu.name, gpu.compute_capability, version, profile, precision)
    engine_path, record_path = cached_engine_paths(cache_dir, key)
    if engine_path.is_file() and record_path.is_file():
        try:
            record = BuildRecord.load(record_path)
            check_engine_compatible(
                record, gpu_name=gpu.name, compute_capability=gpu.compute_capability, tensorrt_version=version
            )
            logger.info("reusing cached TensorRT engine %s", engine_path)
            return engine_path, record
        except (ValueError, EngineMismatch) as exc:
            logger.warning("cached engine %s unusable (%s); rebuilding", engine_path, exc)
    cache_dir.mkdir(parents=True, exist_ok=True)
    device_key = hashlib.sha256(f"{gpu.name}|{gpu.compute_capability}|{version}".encode()).hexdigest()[:16]
    timing = cache_dir / f"timing-{device_key}.cache"  # tactic timings depend on GPU + TensorRT, not on the model
    logger.info("building TensorRT %s engine for %s (profile %s); this takes minutes", precision, gpu.name, profile)
    data, record = build_engine(onnx_path, profile=profile, precision=precision, timing_cache=timing)
    _atomic_write(engine_path, data)
    _atomic_write(record_path, (json.dumps(record.to_json(), indent=2) + "\n").encode("utf-8"))
    return engine_path, record
