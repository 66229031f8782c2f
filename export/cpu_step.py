"""The export step that adds the CPU precisions to a staged bundle: measure OpenVINO fp32 / BF16 / INT8 and ONNX
Runtime's own INT8 against ONNX Runtime fp32, quantise INT8 for both runtimes (OpenVINO's with its fallback), rank
what holds its bound by measured speed, per runtime.

Shared by ``aoi export --weights`` (a new bundle) and ``aoi export --from-bundle`` (precisions added to a bundle).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.cpu_precisions import (
    BF16_MAP50_DROP_MAX,
    INT8_FILE,
    INT8_MAP50_DROP_MAX,
    INT8_WEIGHTS,
    OvRunner,
    bf16_runner,
    cpu_tolerance,
    quantize_int8,
    rank_by_speed,
)
from export.ort_int8 import ORT_INT8_FILE, quantize_ort_int8
from export.parity import FP32_TOLERANCE, ParityResult, Tolerance, compare_runs
from export.report import Progress
from export.runtimes import OrtRunner, Runner, RunOutput, run_all
from export.samples import SampleSet
from service.core.bundle import CpuChoice, OpenVinoSpec, OrtCpuPrecisionName
from train.evaluate import evaluate_detections

__all__ = [
    "CPU_COMPARISONS",
    "CpuPrecisionOptions",
    "CpuPrecisionsResult",
    "add_cpu_precisions",
    "cpu_tools",
    "map_note",
]

logger = logging.getLogger(__name__)
# parity.json comparisons this step writes (one per CPU model it keeps): --from-bundle replaces all of them
CPU_COMPARISONS = ("openvino_fp32_vs_onnx_fp32", "openvino_bf16_vs_onnx_fp32", "openvino_int8_vs_onnx_fp32",
                   "onnx_int8_vs_onnx_fp32")  # fmt: skip


@dataclass(frozen=True)
class CpuPrecisionOptions:
    int8: bool = False
    bf16: bool = False
    bf16_map50_drop_max: float = BF16_MAP50_DROP_MAX
    int8_map50_drop_max: float = INT8_MAP50_DROP_MAX
    calibration_images: int = 300
    speed_batch: int = 4  # batch of the speed ranking (the service's typical CPU batch)

    @property
    def any(self) -> bool:
        return self.int8 or self.bf16


@dataclass
class CpuPrecisionsResult:
    results: list[ParityResult] = field(default_factory=list)
    spec: OpenVinoSpec | None = None
    onnx_int8_file: str | None = None  # onnx.int8_file: ONNX Runtime's QDQ INT8 when it holds its bound
    onnx_precisions: list[OrtCpuPrecisionName] = field(default_factory=lambda: ["fp32"])  # onnx.cpu_precisions
    # bundle cpu_ranking: every (runtime, precision) within its bound, fastest first
    ranking: list[CpuChoice] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)  # parity.json "cpu_precisions": methods, speeds, attempts

    @property
    def failures(self) -> list[str]:
        return [f"{r.name}: {f}" for r in self.results for f in r.failures]


def _map(run: RunOutput, samples: SampleSet) -> dict[str, float]:
    assert samples.split is not None  # checked by the caller: CPU precisions need calibration data
    res = evaluate_detections(run.detections, samples.split)
    return {"map50": float(res.map50), "map50_95": float(res.map50_95)}


def _measure(
    name: str,
    runner: OvRunner | OrtRunner,
    base: tuple[str, RunOutput],
    samples: SampleSet,
    nc: int,
    batch: int,
    tol: Tolerance,
) -> ParityResult:
    run = run_all(runner, samples, nc, batch_size=batch)
    return compare_runs(
        name,
        reference=base[0],
        candidate=runner.name,
        ref_out=base[1].raw,
        cand_out=run.raw,
        ref_dets=base[1].detections,
        cand_dets=run.detections,
        tolerance=tol,
        ref_map=_map(base[1], samples),
        cand_map=_map(run, samples),
    )


def _int8(
    stage: Path, samples: SampleSet, base: tuple[str, RunOutput], nc: int, batch: int, o: CpuPrecisionOptions,
    progress: Progress,
) -> tuple[ParityResult, OvRunner, list[dict[str, Any]]]:  # fmt: skip
    """Plain NNCF quantisation; when it breaks the bound, once more with the ignored-scope fallback (mixed preset,
    decode, head and stem in fp32). NNCF's accuracy-aware quantisation was tried on the default bundle instead and
    did not converge (docs/service.md), so it is not a step here."""
    attempts: list[dict[str, Any]] = []
    for keep in (False, True):
        attempt = quantize_int8(stage / "model.onnx", stage / INT8_FILE, samples, keep_head_fp32=keep,
                                subset=o.calibration_images)  # fmt: skip
        runner = OvRunner(str(attempt.xml), hint="f32", label="int8")
        tol = cpu_tolerance(o.int8_map50_drop_max)
        result = _measure("openvino_int8_vs_onnx_fp32", runner, base, samples, nc, batch, tol)
        m = result.map or {}
        attempts.append({"method": attempt.note, "fp32": attempt.ignored,
                         "delta_map50": m.get("delta_map50"), "delta_map50_95": m.get("delta_map50_95"),
                         "passed": result.passed})  # fmt: skip
        progress.note(f"int8 attempt ({attempt.note}): {map_note(result)}")
        if result.passed:
            break
    return result, runner, attempts


def _ort_int8(
    stage: Path, samples: SampleSet, base: tuple[str, RunOutput], nc: int, batch: int, o: CpuPrecisionOptions,
    input_name: str, progress: Progress,
) -> tuple[ParityResult, OrtRunner, dict[str, Any]]:  # fmt: skip
    """ONNX Runtime's static QDQ INT8 (:mod:`export.ort_int8`: decode, level branches and stem in fp32)."""
    attempt = quantize_ort_int8(stage / "model.onnx", stage / ORT_INT8_FILE, samples, input_name,
                                subset=o.calibration_images)  # fmt: skip
    runner = OrtRunner(attempt.path, label="int8")
    result = _measure("onnx_int8_vs_onnx_fp32", runner, base, samples, nc, batch, cpu_tolerance(o.int8_map50_drop_max))
    m = result.map or {}
    progress.note(f"int8 onnxruntime ({attempt.note}): {map_note(result)}")
    report = {"file": ORT_INT8_FILE, "map50_drop_max": o.int8_map50_drop_max, "method": attempt.note,
              "fp32_nodes": len(attempt.fp32), "delta_map50": m.get("delta_map50"),
              "delta_map50_95": m.get("delta_map50_95"), "passed": result.passed}  # fmt: skip
    return result, runner, report


def map_note(r: ParityResult) -> str:
    """``mAP50 0.6802 (+0.0000), mAP50-95 0.3505 (-0.0010): PASS`` for a progress line."""
    m, nan = r.map or {}, float("nan")
    return (f"mAP50 {m.get('candidate_map50', nan):.4f} ({m.get('delta_map50', nan):+.4f}), mAP50-95 "
            f"{m.get('candidate_map50_95', nan):.4f} ({m.get('delta_map50_95', nan):+.4f}): "
            f"{'PASS' if r.passed else 'FAIL'}")  # fmt: skip


def cpu_tools() -> dict[str, str]:
    """Versions of the CPU-precision tools, for the bundle's provenance."""
    import openvino as ov

    tools = {"openvino": str(ov.get_version()).split("-")[0]}
    try:
        import nncf

        tools["nncf"] = str(nncf.__version__)
    except ImportError:
        pass
    return tools


def add_cpu_precisions(
    stage: Path,
    samples: SampleSet,
    base: tuple[str, RunOutput],
    nc: int,
    batch: int,
    o: CpuPrecisionOptions,
    progress: Progress,
    input_name: str = "images",
) -> CpuPrecisionsResult:
    """Measure OpenVINO fp32 (always, against the FP32 tolerance), BF16 and/or INT8 and ONNX Runtime's INT8 (against
    their mAP50 bound) on ``samples`` and return the comparisons, the bundle's ``openvino`` section, its
    ``onnx.int8_file`` / ``onnx.cpu_precisions`` and the report for parity.json.

    ``--int8`` quantises for both runtimes; one INT8 model beyond the bound is dropped (its numbers stay in the
    report) as long as the other holds it; when neither does, both comparisons fail and the export is refused.

    Every (runtime, precision) within its bound is timed in the same interleaved rounds (one call on all cores at
    ``speed_batch``) and ranked fastest first: the bundle's ``cpu_ranking`` (what ``backend: auto`` serves on a CPU)
    and, per runtime, ``openvino.precisions`` and ``onnx.cpu_precisions``. A BF16 that could only be emulated (no
    BF16 on this CPU, so it cannot be timed) is ranked first: on a CPU with BF16 it measured fastest
    (docs/service.md), and the service only takes it on such a CPU.
    """
    out = CpuPrecisionsResult()
    fp32 = OvRunner(str(stage / "model.onnx"), hint="f32", label="fp32")
    out.results.append(_measure("openvino_fp32_vs_onnx_fp32", fp32, base, samples, nc, batch, FP32_TOLERANCE))
    timed: dict[str, Runner] = {"openvino:fp32": fp32, "onnxruntime-cpu:fp32": OrtRunner(stage / "model.onnx")}
    untimed: list[str] = []  # an emulated BF16: within its bound, but this CPU cannot run (so cannot time) it
    if o.bf16:
        runner, method = bf16_runner(stage / "model.onnx")
        tol = cpu_tolerance(o.bf16_map50_drop_max)
        res = _measure("openvino_bf16_vs_onnx_fp32", runner, base, samples, nc, batch, tol)
        out.results.append(res)
        out.report["bf16"] = {"method": method, "map50_drop_max": o.bf16_map50_drop_max, "passed": res.passed}
        if res.passed:
            if runner.hint != "bf16":
                untimed.append("openvino:bf16")
            else:
                timed["openvino:bf16"] = runner
    int8_file = None
    if o.int8:
        res, runner, attempts = _int8(stage, samples, base, nc, batch, o, progress)
        ort_res, ort_runner, ort_report = _ort_int8(stage, samples, base, nc, batch, o, input_name, progress)
        out.results += [r for r in (res, ort_res) if r.passed] or [res, ort_res]
        out.report["int8"] = {"file": INT8_FILE, "map50_drop_max": o.int8_map50_drop_max, "attempts": attempts,
                              "passed": res.passed}  # fmt: skip
        out.report["int8_onnxruntime"] = ort_report
        if res.passed:
            timed["openvino:int8"] = runner
            int8_file = INT8_FILE
        else:
            for name in (INT8_FILE, INT8_WEIGHTS):
                (stage / name).unlink(missing_ok=True)
        if ort_res.passed:
            timed["onnxruntime-cpu:int8"] = ort_runner
            out.onnx_int8_file = ORT_INT8_FILE
        else:
            (stage / ORT_INT8_FILE).unlink(missing_ok=True)
    x = samples.first_input().repeat(o.speed_batch, axis=0)
    speeds = rank_by_speed(dict(timed.items()), x)
    ranking = untimed + list(speeds)  # untimed (emulated bf16) first, as documented above
    out.ranking = [CpuChoice.model_validate(dict(zip(("backend", "precision"), k.split(":"), strict=True)))
                   for k in ranking]  # fmt: skip
    out.spec = OpenVinoSpec(
        int8_file=int8_file, precisions=[c.precision for c in out.ranking if c.backend == "openvino"]
    )
    out.onnx_precisions = [p for c in out.ranking if c.backend == "onnxruntime-cpu" and (p := c.precision) != "bf16"]
    out.report["speed"] = {
        "images_per_s": {k: round(v, 1) for k, v in speeds.items()},
        "batch": o.speed_batch,
        "ranking": ranking,
        "note": "one synchronous call, all cores, interleaved rounds (median of 3); the ranking behind cpu_ranking, "
        "openvino.precisions and onnx.cpu_precisions, not a benchmark (benchmarks/bench_precision.py)",
    }
    out.report["precisions"] = out.spec.precisions
    return out
