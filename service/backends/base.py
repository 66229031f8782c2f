"""What every backend shares: how many calls it takes at once, its served batch sizes, the output check and the
warm-up (the protocol itself is :class:`service.core.backend.InferenceBackend`)."""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np
import numpy.typing as npt

from service.core.backend import InferenceBackend
from service.core.bundle import ModelBundle
from service.core.errors import BackendUnavailable
from service.core.preprocess import pad_batch

__all__ = ["backend_max_instances", "check_input_type", "check_output", "run_warmup", "served_batch_sizes"]


def backend_max_instances(backend: InferenceBackend) -> int:
    """How many ``infer`` calls the backend accepts at once (1 unless it declares ``max_instances``)."""
    return max(1, int(getattr(backend, "max_instances", 1)))


def served_batch_sizes(max_batch_size: int, model_max: int, dynamic: bool, fixed: int | None = None) -> tuple[int, ...]:
    """Batch sizes a backend serves: ``1..min(max_batch_size, model_max)`` for a dynamic batch axis, else the fixed
    one."""
    if not dynamic:
        return (fixed or 1,)
    return tuple(range(1, max(1, min(max_batch_size, model_max)) + 1))


def check_input_type(model_type: str, bundle: ModelBundle, what: str) -> None:
    """Refuse a model whose input element type is not the bundle's (``model_type``: ``uint8``, ``float32``, ...).

    A float16 model is fed float32 by its backend; a uint8 input must be declared as such, and only then.

    Raises:
        BackendUnavailable: the model and ``bundle.json`` ``input`` disagree.
    """
    spec = bundle.input
    if (model_type == "uint8") != spec.pixels_in_graph:
        raise BackendUnavailable(
            f"{what}: the model's input {spec.name!r} is {model_type}, bundle.json says {spec.dtype} {spec.layout}; "
            "a uint8 NHWC model needs a bundle written by `aoi export --from-bundle DIR --uint8-input`"
        )


def check_output(out: npt.NDArray[np.generic], batch: int, bundle: ModelBundle) -> npt.NDArray[np.float32]:
    """Validate a raw output against the bundle (``(batch, 4+nc, A)``) and return it as float32.

    Raises:
        RuntimeError: the shape is wrong (a model/bundle mismatch or a runtime bug; never silently reshaped).
    """
    expected = (batch, 4 + bundle.nc, bundle.output.num_anchors)
    if tuple(out.shape) != expected:
        raise RuntimeError(f"model output has shape {tuple(out.shape)}, bundle.json says {expected}")
    return np.asarray(out, dtype=np.float32)


class _Runs(Protocol):
    batch_sizes: tuple[int, ...]

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...


def run_warmup(backend: _Runs, bundle: ModelBundle) -> dict[int, float]:
    """Run one grey (pad-value) batch at every served batch size; returns the latency in ms per size."""
    latencies: dict[int, float] = {}
    for b in backend.batch_sizes:
        x = pad_batch(bundle.input, b)
        t0 = time.perf_counter()
        check_output(backend.infer(x), b, bundle)
        latencies[b] = (time.perf_counter() - t0) * 1e3
    return latencies
