"""The export pipeline behind ``aoi export``: checkpoint -> ONNX -> parity -> thresholds -> (FP16 variants) -> bundle.

Everything is written into a staging directory next to ``--out`` and moved into place only when every parity check
passed, so a failed export never leaves a bundle that looks servable.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from export.calibrate import DEFAULT_THRESHOLD, calibrate_thresholds
from export.cpu_step import CpuPrecisionOptions, CpuPrecisionsResult, add_cpu_precisions, cpu_tools, map_note
from export.fp16 import FP16_FILE, convert_to_fp16
from export.native_scale import native_tiling
from export.parity import FP16_TOLERANCE, FP32_TOLERANCE, ParityResult, Tolerance, compare_runs
from export.report import Progress
from export.runtimes import OrtRunner, RunOutput, TorchRunner, median_latency_ms, run_all
from export.samples import SampleSet
from export.to_onnx import OUTPUT_NAME, export_onnx
from service.backends.trt_build import BatchProfile, tensorrt_unavailable_reason
from service.core.bundle import (
    EngineSpec,
    InputSpec,
    ModelBundle,
    OnnxSpec,
    OutputSpec,
    PostprocessSpec,
    TilingSpec,
    load_bundle,
    sha256_file,
    write_bundle,
)
from train.dataset import DatasetError
from train.predict import EVAL_CONF, EVAL_IOU

__all__ = ["ExportError", "ExportOptions", "ExportResult", "run_export"]

logger = logging.getLogger(__name__)


class ExportError(Exception):
    """An export that must stop: ``path`` names the file at fault (or the option), ``code`` is the exit status."""

    def __init__(self, path: Path | str, problem: str, code: int = 1, *, keep_stage: bool = False) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem, self.code = str(path), problem, code
        self.keep_stage = keep_stage  # the staged bundle stays next to --out (parity failures, for inspection)


@dataclass(frozen=True)
class ExportOptions:
    weights: Path
    out: Path
    imgsz: int | None = None  # None: the checkpoint's imgsz
    opset: int = 17
    max_batch: int = 16
    opt_batch: int | None = None  # None: min(4, max_batch)
    engine: bool = False
    calibrate_data: Path | None = None
    split: str = "val"
    mode: Literal["f1", "recall"] = "f1"
    target_recall: float = 0.9
    name: str | None = None
    version: str | None = None
    fp16_onnx: bool = False
    overwrite: bool = False
    timing_cache: Path | None = None
    workspace_mib: int = 2048
    synthetic_images: int = 8
    batch_size: int = 8  # parity/calibration batch (also capped by max_batch)
    native_tile: int | None = None  # frame pixels per model input; None: from the training data
    native_scale: float | None = None  # model-input pixels per frame pixel; None: from the training data
    tiling: Literal["auto", "on", "off"] = "auto"
    tile_overlap: float = 0.25
    full_frame: bool = False
    cpu: CpuPrecisionOptions = field(default_factory=CpuPrecisionOptions)  # --int8 / --bf16: OpenVINO precisions


@dataclass(frozen=True)
class ExportResult:
    root: Path
    bundle: ModelBundle
    parity: dict[str, Any]
    thresholds: dict[str, dict[str, Any]]
    notes: tuple[str, ...] = ()  # printed after the summary (a static batch axis, where the model came from)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _opt_batch(o: ExportOptions) -> int:
    return o.opt_batch if o.opt_batch is not None else min(4, o.max_batch)


def check_options(o: ExportOptions) -> None:
    if not o.weights.is_file():
        raise ExportError(
            o.weights, f"{'ONNX file' if o.weights.suffix.lower() == '.onnx' else 'checkpoint'} not found", 2
        )
    if o.max_batch < 1:
        raise ExportError("--max-batch", f"must be >= 1, got {o.max_batch}", 2)
    if o.opt_batch is not None and not 1 <= o.opt_batch <= o.max_batch:
        raise ExportError("--opt-batch", f"must be in 1..--max-batch ({o.max_batch}), got {o.opt_batch}", 2)
    if o.native_tile is not None and o.native_tile < 1:
        raise ExportError("--native-tile", f"must be >= 1 frame pixels, got {o.native_tile}", 2)
    if o.native_scale is not None and not o.native_scale > 0:
        raise ExportError("--native-scale", f"must be > 0 input pixels per frame pixel, got {o.native_scale}", 2)
    if not 0.0 <= o.tile_overlap <= 0.75:
        raise ExportError("--tile-overlap", f"must be in 0..0.75 of a tile side, got {o.tile_overlap}", 2)
    if o.calibrate_data is not None and not o.calibrate_data.exists():
        raise ExportError(o.calibrate_data, "calibration data not found", 2)
    check_cpu_options(o.cpu, o.calibrate_data)
    if o.out.exists() and any(o.out.iterdir()):
        if not o.overwrite:
            raise ExportError(o.out, "exists and is not empty; choose a new directory or pass --overwrite", 2)
        if not (o.out / "bundle.json").is_file():
            raise ExportError(o.out, "--overwrite only replaces a bundle directory (it has no bundle.json)", 2)
    if o.engine and (reason := tensorrt_unavailable_reason()):
        raise ExportError("--engine", f"cannot build a TensorRT engine here: {reason}. Export without --engine "
                          "(the service can build the engine on the target GPU at first start)", 2)  # fmt: skip


def check_cpu_options(cpu: CpuPrecisionOptions, calibrate_data: Path | None) -> None:
    """--int8 / --bf16 need real images (calibration and the mAP they are bounded by) and OpenVINO (+ NNCF)."""
    if not cpu.any:
        return
    flag = "--int8" if cpu.int8 else "--bf16"
    if calibrate_data is None:
        raise ExportError(flag, "needs --calibrate-data (INT8 is calibrated and both are bounded by mAP50 on real "
                          "images)", 2)  # fmt: skip
    missing = [m for m in (["openvino"] + (["nncf"] if cpu.int8 else [])) if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(flag, f"needs {' and '.join(missing)}: pip install -e '.[cpu,train]'", 2)


def cpu_precisions_step(
    stage: Path, samples: SampleSet, base: tuple[str, RunOutput], nc: int, batch: int, cpu: CpuPrecisionOptions,
    progress: Progress, input_name: str,
) -> CpuPrecisionsResult:  # fmt: skip
    """:func:`~export.cpu_step.add_cpu_precisions`; a precision beyond its bound stops the export (exit 2) and
    removes the staged bundle."""
    what = " + ".join(["fp32"] + (["bf16"] if cpu.bf16 else []) + (["int8 (NNCF)"] if cpu.int8 else []))
    what += ", onnxruntime int8 (QDQ)" if cpu.int8 else ""
    with progress.step(f"CPU precisions: OpenVINO {what}: mAP50 vs onnxruntime fp32 on {len(samples)} images"):
        result = add_cpu_precisions(stage, samples, base, nc, batch, cpu, progress, input_name)
        for r in result.results:
            progress.note(f"{r.name}: {map_note(r)}")
    if result.failures:
        raise ExportError("parity.json", "a CPU precision is outside its bound, nothing was written: "
                          + "; ".join(result.failures), 2)  # fmt: skip
    return result


def _load(o: ExportOptions) -> tuple[Any, dict[str, Any], int]:
    from models import CheckpointError, load_checkpoint

    try:
        detector, ckpt = load_checkpoint(o.weights)
    except CheckpointError as exc:
        raise ExportError(o.weights, exc.problem, 2) from exc
    imgsz = int(o.imgsz or ckpt.get("imgsz", 640))
    if imgsz <= 0 or imgsz % 32:
        raise ExportError("--imgsz", f"must be a positive multiple of 32 (the largest stride), got {imgsz}", 2)
    return detector, ckpt, imgsz


def map_on_split(run: RunOutput, samples: SampleSet) -> dict[str, float] | None:
    if samples.split is None:
        return None
    from train.evaluate import evaluate_detections

    res = evaluate_detections(run.detections, samples.split)
    return {"map50": float(res.map50), "map50_95": float(res.map50_95)}


def _compare(
    name: str, ref: tuple[str, RunOutput], cand: tuple[str, RunOutput], samples: SampleSet, tol: Tolerance
) -> ParityResult:
    return compare_runs(
        name,
        reference=ref[0],
        candidate=cand[0],
        ref_out=ref[1].raw,
        cand_out=cand[1].raw,
        ref_dets=ref[1].detections,
        cand_dets=cand[1].detections,
        tolerance=tol,
        ref_map=map_on_split(ref[1], samples),
        cand_map=map_on_split(cand[1], samples),
    )


def score_thresholds(
    o: ExportOptions, run: RunOutput, samples: SampleSet, names: list[str], progress: Progress
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    if samples.split is None:
        msg = (f"no --calibrate-data: every class uses the default score threshold {DEFAULT_THRESHOLD}; "
               "calibrate on a validation split before putting this bundle on a line")  # fmt: skip
        logger.warning(msg)
        progress.note(f"WARNING: {msg}")
        per_class = {n: {"threshold": DEFAULT_THRESHOLD, "note": "default (not calibrated)"} for n in names}
        return per_class, {"mode": "default", "threshold": DEFAULT_THRESHOLD, "warning": msg}
    records = samples.split.records
    cal = calibrate_thresholds(run.detections, records, names, mode=o.mode, target_recall=o.target_recall)
    per_class = {c.name: c.to_json() for c in cal}
    meta = {
        "mode": o.mode,
        "target_recall": o.target_recall if o.mode == "recall" else None,
        "data": o.calibrate_data.name if o.calibrate_data else None,  # no build-host path in a bundle
        "split": o.split,
        "images": len(records),
        "match_iou": 0.5,
        "scored_by": f"onnxruntime fp32 detections at conf {EVAL_CONF:g}, NMS IoU {EVAL_IOU:g} "
        "(what the service computes)",
        "per_class": per_class,
    }
    return per_class, meta


def load_samples(o: ExportOptions, spec: InputSpec, names: list[str], source: str) -> SampleSet:
    """The calibration split (its classes must be ``names``, in order) or synthetic images when none is given."""
    try:
        if o.calibrate_data is not None:
            samples = SampleSet.from_split(o.calibrate_data, o.split, spec)
        else:
            samples = SampleSet.synthetic(spec, o.synthetic_images)
    except DatasetError as exc:
        raise ExportError(exc.path, exc.problem, 2) from exc
    split_names = list(getattr(samples.split, "class_names", names))
    if split_names != names:
        what = f"the dataset's classes {split_names} differ from the {source}'s {names} (same names, same order)"
        raise ExportError(o.calibrate_data or "--calibrate-data", what, 2)
    return samples


def write_verified(bundle: ModelBundle, stage: Path) -> ModelBundle:
    """Write ``bundle.json`` (sha256 of every file) into ``stage`` and read it back as the service will."""
    write_bundle(bundle, stage)
    return load_bundle(stage)


def install_stage(stage: Path, out: Path) -> ModelBundle:
    """Replace ``out`` by the verified staging directory; the bundle as loaded from there."""
    if out.exists():
        shutil.rmtree(out)
    stage.rename(out)
    return load_bundle(out)


def tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def stage_dir(out: Path) -> Path:
    stage = out.parent / f".{out.name}.partial"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return stage


def _fp16_onnx(stage: Path, samples: SampleSet, base: tuple[str, RunOutput], nc: int, batch: int) -> dict[str, Any]:
    """Convert, compare against ONNX fp32 and time both on CPU (the only provider measurable without a GPU)."""
    path = convert_to_fp16(stage / "model.onnx", stage / FP16_FILE)
    runner = OrtRunner(path, label="fp16")
    run = run_all(runner, samples, nc, batch_size=batch)
    result = _compare("onnx_fp16_vs_onnx_fp32", base, (runner.name, run), samples, FP16_TOLERANCE)
    x = samples.first_input()
    timing = {
        "provider": runner.provider,
        "fp32_batch1_ms": median_latency_ms(OrtRunner(stage / "model.onnx"), x),
        "fp16_batch1_ms": median_latency_ms(runner, x),
        "note": "measured on CPU only; FP16 is meant for the CUDA provider, measure there before choosing it",
    }
    return {"file": FP16_FILE, "result": result, "timing": timing}


def _engine(o: ExportOptions, stage: Path, samples: SampleSet, base: tuple[str, RunOutput], nc: int) -> ParityResult:
    from export.to_tensorrt import TrtRunner, build_bundle_engine

    profile = BatchProfile(1, _opt_batch(o), o.max_batch)
    built = build_bundle_engine(
        stage / "model.onnx", stage, profile=profile, timing_cache=o.timing_cache, workspace_mib=o.workspace_mib
    )
    runner = TrtRunner(built.engine_path, profile)
    run = run_all(runner, samples, nc, batch_size=min(o.batch_size, o.max_batch))
    return _compare("tensorrt_fp16_vs_onnx_fp32", base, (runner.name, run), samples, FP16_TOLERANCE)


def dataset_tag(data: Path | None, ckpt: dict[str, Any]) -> str:
    """The dataset part of a default bundle name: the dataset's folder name, lower case (``NEU-DET`` -> ``neu-det``;
    ``DeepPCB/data.yaml`` -> ``deeppcb``, ``pcb.yaml`` -> ``pcb``); without calibration data, the training data's."""
    if data is None:
        trained = (ckpt.get("train_summary") or {}).get("dataset")
        if not trained:
            return "custom"
        data = Path(str(trained))
    if data.suffix.lower() in (".yaml", ".yml"):
        data = data.parent if data.stem.lower() == "data" else Path(data.stem)
    return data.name.lower() or "custom"


def portable_path(path: Path) -> str:
    """A path as it may appear in a bundle: relative paths as given, absolute ones by their last part only."""
    return path.name if path.is_absolute() else path.as_posix()


def _provenance(o: ExportOptions, ckpt: dict[str, Any]) -> dict[str, Any]:
    summary = dict(ckpt.get("train_summary") or {})
    if "dataset" in summary:  # checkpoints before 2026-12 recorded the training data's absolute path
        summary["dataset"] = Path(str(summary["dataset"])).name
    return {
        "source_checkpoint": o.weights.name,
        "source_sha256": sha256_file(o.weights),
        "train_summary": summary,
        "metrics": summary.get("metrics", summary.get("best_metrics")),
        "git_commit": git_commit(),
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "tools": {**tool_versions(), **(cpu_tools() if o.cpu.any else {})},
        **({"imported_from": ckpt["imported_from"]} if "imported_from" in ckpt else {}),
        "export_options": {k: portable_path(v) if isinstance(v, Path) else v for k, v in asdict(o).items()},
    }


def run_export(o: ExportOptions, progress: Progress | None = None) -> ExportResult:
    """Run every step; raise :class:`ExportError` (nothing at ``o.out`` changes) when one fails or parity breaks."""
    progress = progress or Progress(total=0, quiet=True)
    check_options(o)
    with progress.step("load checkpoint"):
        detector, ckpt, imgsz = _load(o)
        names = [str(n) for n in ckpt["class_names"]]
        reference = copy.deepcopy(detector)  # unfused: parity also covers the Conv+BN folding
    spec = InputSpec(width=imgsz, height=imgsz)
    with progress.step("load parity images"):  # before anything is written: a bad dataset leaves nothing behind
        samples = load_samples(o, spec, names, "checkpoint")
    stage = stage_dir(o.out)
    try:
        with progress.step(f"ONNX export (opset {o.opset}, dynamic batch, onnxslim, checker)"):
            meta = {"architecture": detector.variant, "source_sha256": sha256_file(o.weights)}
            onnx_info = export_onnx(detector, stage / "model.onnx", spec=spec, class_names=names, opset=o.opset,
                                    metadata=meta)  # fmt: skip
        batch = min(o.batch_size, o.max_batch)
        base, results = _fp32_parity(reference, stage, samples, len(names), batch, progress)
        with progress.step("per-class score thresholds"):
            per_class, calibration = score_thresholds(o, base[1], samples, names, progress)
        variant_results, fp16, cpu = _variants(o, stage, samples, base, len(names), batch, spec.name, progress)
        results += variant_results
        parity = _write_parity(stage, samples, results, fp16, cpu)
        tiling, tiling_source = _tiling(o, spec, ckpt, imgsz, samples)
        with progress.step("write bundle.json (sha256 of every file) and verify"):
            progress.note(f"native tile: {f'{tiling.tile_width}x{tiling.tile_height} frame px' if tiling else 'none'} "
                          f"({tiling_source})")  # fmt: skip
            bundle = _bundle(o, ckpt, detector.variant, names, spec, onnx_info.num_anchors, fp16=fp16, cpu=cpu,
                             per_class=per_class, calibration=calibration, tiling=tiling)  # fmt: skip
            write_verified(bundle, stage)
        _refuse_failed_parity(results, stage)
        return ExportResult(o.out, install_stage(stage, o.out), parity, per_class)
    except BaseException as exc:
        if not getattr(exc, "keep_stage", False):  # only a bundle that failed parity stays, for inspection
            shutil.rmtree(stage, ignore_errors=True)
        raise


def _fp32_parity(
    reference: Any, stage: Path, samples: SampleSet, nc: int, batch: int, progress: Progress
) -> tuple[tuple[str, RunOutput], list[ParityResult]]:
    """Parity step: torch fp32 vs onnxruntime fp32; the onnxruntime run (the base of every later comparison)."""
    with progress.step(f"parity torch fp32 vs onnxruntime fp32 on {len(samples)} images"):
        torch_run = run_all(TorchRunner(reference), samples, nc, batch_size=batch)
        ort = OrtRunner(stage / "model.onnx")
        ort_run = run_all(ort, samples, nc, batch_size=batch)
        base = (ort.name, ort_run)
        results = [_compare("onnx_fp32_vs_torch_fp32", ("torch fp32", torch_run), base, samples, FP32_TOLERANCE)]
    return base, results


def _variants(
    o: ExportOptions, stage: Path, samples: SampleSet, base: tuple[str, RunOutput], nc: int, batch: int,
    input_name: str, progress: Progress,
) -> tuple[list[ParityResult], dict[str, Any] | None, CpuPrecisionsResult | None]:  # fmt: skip
    """Optional model steps (FP16 ONNX, TensorRT engine, CPU precisions): their parity results, FP16 and CPU parts."""
    results: list[ParityResult] = []
    fp16: dict[str, Any] | None = None
    if o.fp16_onnx:
        with progress.step("FP16 ONNX variant + parity"):
            fp16 = _fp16_onnx(stage, samples, base, nc, batch)
            results.append(fp16["result"])
    if o.engine:
        with progress.step(f"TensorRT FP16 engine (batch 1..{o.max_batch}, opt {_opt_batch(o)}) + parity"):
            results.append(_engine(o, stage, samples, base, nc))
    cpu = cpu_precisions_step(stage, samples, base, nc, batch, o.cpu, progress, input_name) if o.cpu.any else None
    if cpu is not None:
        results += cpu.results
    return results, fp16, cpu


def _write_parity(
    stage: Path, samples: SampleSet, results: list[ParityResult], fp16: dict[str, Any] | None,
    cpu: CpuPrecisionsResult | None,
) -> dict[str, Any]:  # fmt: skip
    """Write ``parity.json`` (every comparison, FP16 timing, CPU precision report) into ``stage``; its content."""
    parity: dict[str, Any] = {
        "images": {"count": len(samples), "source": samples.source},
        "comparisons": {r.name: r.to_json() for r in results},
        "passed": all(r.passed for r in results),
    }
    if fp16 is not None:
        parity["comparisons"]["onnx_fp16_vs_onnx_fp32"]["timing"] = fp16["timing"]
    if cpu is not None:
        parity["cpu_precisions"] = cpu.report
    (stage / "parity.json").write_text(json.dumps(parity, indent=2) + "\n", encoding="utf-8")
    return parity


def _tiling(
    o: ExportOptions, spec: InputSpec, ckpt: dict[str, Any], imgsz: int, samples: SampleSet
) -> tuple[TilingSpec | None, str]:
    """The bundle's native tiling (from the options, else the training data) and where it came from."""
    return native_tiling(
        input_width=spec.width,
        input_height=spec.height,
        train_imgsz=int(ckpt.get("imgsz", imgsz)),
        ckpt=ckpt,
        calibration=samples.split,
        native_tile=o.native_tile,
        native_scale=o.native_scale,
        mode=o.tiling,
        overlap=o.tile_overlap,
        full_frame=o.full_frame,
    )


def _bundle(
    o: ExportOptions, ckpt: dict[str, Any], architecture: str, names: list[str], spec: InputSpec, num_anchors: int,
    *, fp16: dict[str, Any] | None, cpu: CpuPrecisionsResult | None, per_class: dict[str, dict[str, Any]],
    calibration: dict[str, Any], tiling: TilingSpec | None,
) -> ModelBundle:  # fmt: skip
    """The bundle description of the staged files (default name and version, thresholds, provenance)."""
    return ModelBundle(
        name=o.name or f"{architecture}.{dataset_tag(o.calibrate_data, ckpt)}.fp32",
        version=o.version or datetime.now(UTC).strftime("%Y%m%d") + "-" + sha256_file(o.weights)[:8],
        architecture=architecture,
        classes=names,
        input=spec,
        output=OutputSpec(name=OUTPUT_NAME, num_anchors=num_anchors),
        onnx=OnnxSpec(
            opset=o.opset,
            dynamic_batch=True,
            max_batch=o.max_batch,
            fp16_file=fp16["file"] if fp16 is not None else None,
            int8_file=cpu.onnx_int8_file if cpu is not None else None,
            cpu_precisions=cpu.onnx_precisions if cpu is not None else ["fp32"],
        ),
        engine=EngineSpec(precision="fp16") if o.engine else None,
        openvino=cpu.spec if cpu is not None else None,
        cpu_ranking=cpu.ranking if cpu is not None else [],
        postprocess=PostprocessSpec(score_thresholds={n: float(t["threshold"]) for n, t in per_class.items()}),
        tiling=tiling,
        calibration=calibration,
        provenance=_provenance(o, ckpt),
    )


def _refuse_failed_parity(results: list[ParityResult], stage: Path) -> None:
    """Stop (keeping the staged bundle for inspection) when any comparison is outside its tolerance."""
    failed = [f"{r.name}: {f}" for r in results for f in r.failures]
    if failed:
        raise ExportError(stage / "parity.json", "parity outside tolerance (bundle kept for inspection at "
                          f"{stage}, not installed): " + "; ".join(failed), keep_stage=True)  # fmt: skip
