"""OpenVINO CPU backend: the bundle's fp32 ONNX (f32 or bf16 precision hint) or its NNCF INT8 IR.

The precision is always explicit and read back from the compiled model (OpenVINO would otherwise run BF16 on any CPU
that has it). Compiled models are cached on disk in a folder keyed by model, runtime, CPU and precision
(:func:`~service.backends.ov_options.ov_cache_dir`), so a restart loads them instead of compiling. What is asked of
OpenVINO is decided by the pure functions of ``ov_options``.
"""

from __future__ import annotations

import logging
import queue
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from service.backends.base import check_input_type, check_output, run_warmup, served_batch_sizes
from service.backends.ov_options import OvModelChoice, compile_properties, ov_cache_dir, select_ov_model
from service.core.bundle import ModelBundle, sha256_file
from service.core.errors import BackendUnavailable

__all__ = ["BatchShapes", "OpenVinoBackend", "cpu_capabilities", "openvino_unavailable_reason"]

logger = logging.getLogger(__name__)
BatchShapes = Literal["static", "dynamic"]
_HINT_NAMES = {"f32": "f32", "float32": "f32", "bf16": "bf16", "bfloat16": "bf16"}


def openvino_unavailable_reason() -> str | None:
    """None when the ``openvino`` package imports and offers its CPU device, else why not."""
    try:
        import openvino as ov
    except ImportError as exc:
        return f"openvino is not installed ({exc}); pip install -e '.[cpu]'"
    try:
        devices = ov.Core().available_devices
    except RuntimeError as exc:
        return f"openvino {ov.get_version()} cannot start ({exc})"
    if "CPU" not in devices:
        return f"openvino {ov.get_version()} offers no CPU device (devices {devices})"
    return None


def cpu_capabilities(core: Any) -> list[str]:
    """The CPU's ``OPTIMIZATION_CAPABILITIES`` (``FP32``, ``INT8``, ``BF16`` where AVX-512 BF16 or AMX exist, ...)."""
    return [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def _hint_name(value: Any) -> str:
    """``INFERENCE_PRECISION_HINT`` as read back (an ``ov.Type``) in the names we set (``f32``, ``bf16``)."""
    name = str(getattr(value, "get_type_name", lambda: value)())
    return _HINT_NAMES.get(name, name)


class OpenVinoBackend:
    """``kind`` ``openvino``: one compiled model per served batch size (``batch_shapes`` static, the default: measured
    faster in most of an interleaved comparison, docs/service.md) or one dynamic-batch model.

    ``streams`` model instances: OpenVINO CPU streams sharing ``threads`` inference threads, with one infer request
    per stream and batch size; ``infer`` may be called from ``streams`` threads at once and runs on a free stream.
    ``cache_root`` holds the compiled-model cache folders (never inside the bundle).
    """

    MAX_STREAMS = 64
    kind = "openvino"

    def __init__(
        self,
        bundle: ModelBundle,
        *,
        precision: str = "auto",
        max_batch_size: int = 8,
        streams: int = 1,
        threads: int = 1,
        cache_root: Path | None = Path("engine-cache/openvino"),
        batch_shapes: BatchShapes = "static",
    ) -> None:
        if not 1 <= streams <= self.MAX_STREAMS:
            raise ValueError(f"streams must be 1..{self.MAX_STREAMS}, got {streams}")
        if (why := openvino_unavailable_reason()) is not None:
            raise BackendUnavailable(f"openvino: {why}")
        import openvino as ov

        self._bundle = bundle
        core = ov.Core()
        self.capabilities = cpu_capabilities(core)
        cpu_name = str(core.get_property("CPU", "FULL_DEVICE_NAME"))
        self.choice: OvModelChoice = select_ov_model(bundle, precision, self.capabilities, cpu_name)
        self.precision: str = self.choice.precision
        self.device = f"cpu {cpu_name}"
        self.max_instances = streams
        self.streams, self.threads = streams, threads
        self.runtime_version = str(ov.get_version())
        self._path = bundle.path(self.choice.file)
        self.cache_dir = self._cache_dir(cache_root, cpu_name)
        props = compile_properties(self.choice, streams=streams, threads=threads, cache_dir=self.cache_dir)
        model = self._read(core)
        self._in_dtype = np.dtype(model.inputs[0].get_element_type().to_dtype())
        check_input_type(self._in_dtype.name, bundle, str(self._path))
        dynamic = bundle.onnx.dynamic_batch and model.inputs[0].get_partial_shape()[0].is_dynamic
        self.batch_sizes = served_batch_sizes(max_batch_size, bundle.onnx.max_batch, dynamic, None)
        self.batch_shapes: BatchShapes = batch_shapes if dynamic else "static"
        start = time.perf_counter()
        self._compiled = self._compile(core, model, props)
        self.compile_s = time.perf_counter() - start
        self.cache_hit = all(bool(c.get_property("LOADED_FROM_CACHE")) for c in self._compiled.values())
        self._check_hint()
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._requests = {b: [c.create_infer_request() for _ in range(streams)] for b, c in self._compiled.items()}
        for slot in range(streams):
            self._free.put(slot)
        cache = "off" if self.cache_dir is None else "hit" if self.cache_hit else "miss (compiled and stored)"
        logger.info(
            "openvino %s: %s (%s; %s) on %s, %d stream(s) sharing %d thread(s), %s batch; compiled model cache %s "
            "in %s (%.2f s)", self.runtime_version, self._path.name, self.precision, self.choice.reason, self.device,
            streams, threads, self.batch_shapes, cache, self.cache_dir, self.compile_s,
        )  # fmt: skip

    def _cache_dir(self, root: Path | None, cpu_name: str) -> Path | None:
        if root is None:
            return None
        if self._bundle.root is not None and root.resolve().is_relative_to(self._bundle.root.resolve()):
            raise BackendUnavailable(
                f"openvino_cache {root} is inside the bundle {self._bundle.root}; compiled models depend on the CPU "
                "and runtime, so keep them out of the bundle (set AOI_OPENVINO_CACHE to another folder)"
            )
        files = [self.choice.file]
        if self._path.suffix == ".xml":  # an IR's weights are in its .bin: both identify the model
            files.append(self._path.with_suffix(".bin").name)
        digest = "+".join(self._bundle.files.get(f) or sha256_file(self._bundle.path(f)) for f in files)
        path = ov_cache_dir(
            root, model_sha256=digest, runtime_version=self.runtime_version, cpu_name=cpu_name,
            precision=self.choice.precision,
        )  # fmt: skip
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendUnavailable(f"{path}: cannot create the OpenVINO cache ({exc.strerror}); set "
                                     "AOI_OPENVINO_CACHE to a writable folder") from exc  # fmt: skip
        return path

    def _read(self, core: Any) -> Any:
        try:
            model = core.read_model(str(self._path))
        except Exception as exc:  # openvino raises RuntimeError subclasses of its own for unreadable models
            raise BackendUnavailable(f"{self._path}: OpenVINO cannot read the model ({exc})") from exc
        names = {n for p in model.inputs for n in p.get_names()}, {n for p in model.outputs for n in p.get_names()}
        want_in, want_out = self._bundle.input.name, self._bundle.output.name
        if want_in not in names[0]:
            raise BackendUnavailable(f"{self._path}: no input {want_in!r} (bundle.json input.name); has {names[0]}")
        if want_out not in names[1]:
            raise BackendUnavailable(f"{self._path}: no output {want_out!r} (bundle.json output.name); has {names[1]}")
        return model

    def _compile(self, core: Any, model: Any, props: dict[str, str | int]) -> dict[int, Any]:
        """Compiled models by batch size (static: one per served size; dynamic: one, shared by every size)."""
        spec = self._bundle.input
        try:
            if self.batch_shapes == "dynamic":
                compiled = core.compile_model(model, "CPU", props)
                return dict.fromkeys(self.batch_sizes, compiled)
            out = {}
            for b in self.batch_sizes:
                model.reshape({spec.name: [b, *spec.sample_shape]})
                out[b] = core.compile_model(model, "CPU", props)
            return out
        except Exception as exc:  # an unsupported op or a property this OpenVINO rejects
            raise BackendUnavailable(f"{self._path}: OpenVINO cannot compile the model ({exc})") from exc

    def _check_hint(self) -> None:
        """The precision OpenVINO really computes in must be the one we report (it ignores an unsupported hint)."""
        for compiled in set(self._compiled.values()):
            got = _hint_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
            if got != self.choice.hint:
                raise BackendUnavailable(
                    f"openvino compiled {self._path.name} with precision hint {got}, not {self.choice.hint} as asked "
                    f"({self.device}, capabilities {self.capabilities}); set precision (AOI_PRECISION) to fp32"
                )

    def compiled_property(self, name: str) -> Any:
        """A property of the (first) compiled model, e.g. ``INFERENCE_PRECISION_HINT`` or ``NUM_STREAMS``."""
        return next(iter(self._compiled.values())).get_property(name)

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        slot = self._free.get()
        try:
            return self._run(slot, batch)
        finally:
            self._free.put(slot)

    def _run(self, slot: int, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        n = batch.shape[0]
        requests = self._requests.get(n)
        if requests is None:
            raise RuntimeError(f"batch of {n}: the backend serves batch sizes {self.batch_sizes}")
        # share_inputs: the request reads the caller's batch in place (the batcher's buffer, letterboxed into
        # directly) instead of copying it into a tensor of its own first; safe because infer() is synchronous.
        x = np.ascontiguousarray(batch, dtype=self._in_dtype)  # float32, or uint8 pixels: no copy when it matches
        result = requests[slot].infer({0: x}, share_inputs=True, share_outputs=True)
        # One copy: the shared result aliases the request's output tensor, which the next call on this slot overwrites.
        return check_output(np.array(result[0]), n, self._bundle)

    def warmup(self) -> dict[int, float]:
        """Every stream at every served batch size; returns the first stream's latency in ms per size."""
        slots = [self._free.get() for _ in range(self.streams)]
        try:
            timings = [run_warmup(_OneStream(self, s), self._bundle) for s in slots]
        finally:
            for s in slots:
                self._free.put(s)
        return timings[0]

    def close(self) -> None:
        self._requests.clear()
        self._compiled.clear()


class _OneStream:
    """An :class:`OpenVinoBackend` pinned to one of its infer-request slots (warm-up of each stream)."""

    def __init__(self, backend: OpenVinoBackend, slot: int) -> None:
        self.batch_sizes = backend.batch_sizes
        self._backend, self._slot = backend, slot

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return self._backend._run(self._slot, batch)
