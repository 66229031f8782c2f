"""What the OpenVINO backend asks OpenVINO for: the model file and precision, the compile properties (precision hint,
streams, threads) and the compiled-model cache folder.

Pure functions (no openvino import), so every choice is testable without the runtime and on any CPU.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from service.core.bundle import ModelBundle
from service.core.errors import BackendUnavailable

__all__ = [
    "PRECISION_HINTS",
    "CpuPrecision",
    "OvModelChoice",
    "compile_properties",
    "ov_cache_dir",
    "select_ov_model",
]

CpuPrecision = Literal["fp32", "bf16", "int8"]
# INFERENCE_PRECISION_HINT per precision. It is always set: without it OpenVINO runs BF16 on every CPU that has
# AVX-512 BF16 or AMX, a precision nobody measured. INT8 models keep f32 for the layers NNCF left unquantised,
# which is what `aoi export --int8` measured.
PRECISION_HINTS: dict[CpuPrecision, str] = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
_SETTING = "set precision (AOI_PRECISION / --precision)"


@dataclass(frozen=True)
class OvModelChoice:
    file: str  # bundle-relative model file OpenVINO reads (the fp32 ONNX, or the INT8 IR .xml)
    precision: CpuPrecision  # what really computes (read back from the compiled model before it is reported)
    hint: str  # INFERENCE_PRECISION_HINT
    reason: str


def _has_bf16(capabilities: Sequence[str]) -> bool:
    return "BF16" in capabilities


def select_ov_model(
    bundle: ModelBundle, requested: str, capabilities: Sequence[str], cpu_name: str = "this CPU"
) -> OvModelChoice:
    """Pick the model file and precision from the bundle and the CPU's ``OPTIMIZATION_CAPABILITIES``.

    - ``fp32``: the bundle's ONNX, f32 hint.
    - ``bf16``: the same ONNX with the bf16 hint; only on a CPU that lists ``BF16`` (AVX-512 BF16 or AMX).
    - ``int8``: the bundle's INT8 IR (``openvino.int8_file``, written by ``aoi export --int8``).
    - ``auto``: the first of ``openvino.precisions`` (export's measured order: fastest first, each within its
      accuracy bound) that this CPU can run; a bundle without that section gets fp32.

    Raises:
        BackendUnavailable: the requested precision cannot run here or the bundle lacks its file; says which setting.
    """
    ov = bundle.openvino
    caps = ", ".join(capabilities)
    if requested == "fp32":
        return OvModelChoice(bundle.onnx.file, "fp32", PRECISION_HINTS["fp32"], "fp32 requested")
    if requested == "bf16":
        if not _has_bf16(capabilities):
            raise BackendUnavailable(
                f"precision bf16 requested, but {cpu_name} has no BF16 (OpenVINO OPTIMIZATION_CAPABILITIES: {caps}; "
                f"it needs AVX-512 BF16 or AMX); {_SETTING} to auto, fp32 or int8"
            )
        return OvModelChoice(bundle.onnx.file, "bf16", PRECISION_HINTS["bf16"], "bf16 requested")
    if requested == "int8":
        if ov is None or ov.int8_file is None:
            raise BackendUnavailable(
                "precision int8 requested, but the bundle has no INT8 model (bundle.json openvino.int8_file is not "
                f"set); re-export with `aoi export --int8 --calibrate-data DIR`, or {_SETTING} to auto or fp32"
            )
        return OvModelChoice(ov.int8_file, "int8", PRECISION_HINTS["int8"], f"int8 requested: {ov.int8_file}")
    if requested != "auto":
        raise BackendUnavailable(f"precision {requested} is not served by OpenVINO; {_SETTING} to auto, fp32, bf16 "
                                 "or int8")  # fmt: skip
    if ov is None:
        return OvModelChoice(bundle.onnx.file, "fp32", "f32", "auto: fp32 (the bundle measured no other precision)")
    skipped = []
    for p in ov.precisions:
        if p == "bf16" and not _has_bf16(capabilities):
            skipped.append(f"bf16 needs a CPU with BF16 ({cpu_name} has {caps})")
            continue
        if p == "int8" and ov.int8_file is None:
            continue
        file = ov.int8_file if p == "int8" and ov.int8_file else bundle.onnx.file
        why = f"auto: {p}, the fastest precision the bundle measured within its bound"
        return OvModelChoice(file, p, PRECISION_HINTS[p], why + (f" (skipped {'; '.join(skipped)})" if skipped else ""))
    note = f" ({'; '.join(skipped)})" if skipped else ""
    return OvModelChoice(bundle.onnx.file, "fp32", "f32", "auto: fp32" + note)


def compile_properties(
    choice: OvModelChoice, *, streams: int, threads: int, cache_dir: Path | None
) -> dict[str, str | int]:
    """``compile_model`` properties: the precision hint, ``streams`` CPU streams (one per model instance, each runs
    one infer request at a time) sharing ``threads`` inference threads, and the cache folder.

    The stream and thread counts are explicit because the performance hints pick them from the host's cores, not from
    a container's CPU quota; the hint is still given (LATENCY for one stream, THROUGHPUT for several) because it
    also steers OpenVINO's memory and scheduling defaults.
    """
    props: dict[str, str | int] = {
        "INFERENCE_PRECISION_HINT": choice.hint,
        "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT",
        "NUM_STREAMS": streams,
        "INFERENCE_NUM_THREADS": threads,
    }
    if cache_dir is not None:
        props["CACHE_DIR"] = str(cache_dir)
    return props


def ov_cache_dir(
    root: Path, *, model_sha256: str, runtime_version: str, cpu_name: str, precision: CpuPrecision
) -> Path:
    """The compiled-model cache folder under ``root`` (the ``openvino_cache`` setting): ``<precision>-<key>``, the key
    a hash of the model file's sha256, the OpenVINO version, the CPU model and the precision. OpenVINO itself names
    its blobs after the graph and compile properties; a folder per model, runtime and CPU makes stale blobs visible
    and easy to delete."""
    text = json.dumps([model_sha256, runtime_version, cpu_name, precision])
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    return root / f"{precision}-{key}"
