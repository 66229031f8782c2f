"""``aoi export --from-bundle``: add the CPU precisions (BF16 accuracy, INT8 models for OpenVINO and ONNX Runtime)
to an existing bundle without its training checkpoint. The bundle's ONNX, thresholds, tiling and parity records are
kept; ONNX Runtime fp32 on the calibration split is the reference, as in a full export.

Staged next to ``--out`` like :func:`export.pipeline.run_export`: a precision beyond its bound leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from export.cpu_precisions import INT8_FILE, INT8_WEIGHTS
from export.cpu_step import CPU_COMPARISONS, CpuPrecisionOptions, cpu_tools
from export.ort_int8 import ORT_INT8_FILE
from export.pipeline import ExportError, ExportResult, check_cpu_options, cpu_precisions_step
from export.report import Progress
from export.runtimes import OrtRunner, run_all
from export.samples import SampleSet
from service.core.bundle import BUNDLE_FILE, BundleError, load_bundle, write_bundle
from train.dataset import DatasetError

__all__ = ["AddPrecisionsOptions", "run_add_precisions"]


@dataclass(frozen=True)
class AddPrecisionsOptions:
    source: Path  # bundle directory (may equal ``out`` with ``overwrite``)
    out: Path
    calibrate_data: Path
    split: str = "val"
    cpu: CpuPrecisionOptions = field(default_factory=lambda: CpuPrecisionOptions(int8=True, bf16=True))
    version: str | None = None
    overwrite: bool = False
    batch_size: int = 8


def _check(o: AddPrecisionsOptions) -> None:
    if not o.cpu.any:
        raise ExportError("--from-bundle", "adds CPU precisions: pass --int8 and/or --bf16", 2)
    if not o.calibrate_data.exists():
        raise ExportError(o.calibrate_data, "calibration data not found", 2)
    check_cpu_options(o.cpu, o.calibrate_data)
    if o.out.exists() and any(o.out.iterdir()) and not o.overwrite:
        raise ExportError(o.out, "exists and is not empty; choose a new directory or pass --overwrite", 2)
    if o.out.exists() and any(o.out.iterdir()) and not (o.out / BUNDLE_FILE).is_file():
        raise ExportError(o.out, "--overwrite only replaces a bundle directory (it has no bundle.json)", 2)


def _stage(o: AddPrecisionsOptions) -> Path:
    """The source bundle's files, less bundle.json and any earlier INT8 model, copied to the staging folder."""
    stage = o.out.parent / f".{o.out.name}.partial"
    if stage.exists():
        shutil.rmtree(stage)
    old_int8 = {INT8_FILE, INT8_WEIGHTS, ORT_INT8_FILE}
    shutil.copytree(o.source, stage, ignore=lambda _d, names: [n for n in names if n in {BUNDLE_FILE, *old_int8}])
    return stage


def run_add_precisions(o: AddPrecisionsOptions, progress: Progress | None = None) -> ExportResult:
    """Measure and add the CPU precisions; raise :class:`ExportError` (nothing at ``o.out`` changes) on failure."""
    progress = progress or Progress(total=0, quiet=True)
    _check(o)
    with progress.step(f"load bundle {o.source.name} and the parity images"):
        try:
            bundle = load_bundle(o.source)
        except BundleError as exc:
            raise ExportError(exc.path, exc.problem, 2) from exc
        if bundle.input.pixels_in_graph:
            raise ExportError(o.source, "its models take uint8 NHWC pixels: add --int8 / --bf16 to the float bundle it "
                              "came from, then convert that with --uint8-input", 2)  # fmt: skip
        try:
            samples = SampleSet.from_split(o.calibrate_data, o.split, bundle.input)
        except DatasetError as exc:
            raise ExportError(exc.path, exc.problem, 2) from exc
        if list(samples.split.class_names if samples.split else []) != bundle.classes:
            raise ExportError(o.calibrate_data, f"the dataset's classes differ from the bundle's {bundle.classes}", 2)
    stage = _stage(o)
    try:
        batch = min(o.batch_size, bundle.onnx.max_batch)
        with progress.step(f"reference: onnxruntime fp32 on {len(samples)} images"):
            ort = OrtRunner(stage / bundle.onnx.file)
            base = (ort.name, run_all(ort, samples, bundle.nc, batch_size=batch))
        cpu = cpu_precisions_step(stage, samples, base, bundle.nc, batch, o.cpu, progress, bundle.input.name)
        with progress.step("write parity.json, bundle.json (sha256 of every file) and verify"):
            parity = _merged_parity(stage, samples, cpu.results, cpu.report)
            provenance = {**bundle.provenance, "cpu_precisions_added": _added(o, bundle.version)}
            onnx = bundle.onnx.model_copy(update={"int8_file": cpu.onnx_int8_file,
                                                  "cpu_precisions": cpu.onnx_precisions})  # fmt: skip
            new = bundle.model_copy(update={"openvino": cpu.spec, "onnx": onnx, "cpu_ranking": cpu.ranking,
                                            "version": o.version or bundle.version,
                                            "provenance": provenance})  # fmt: skip
            write_bundle(new, stage)
            load_bundle(stage)
        if o.out.exists():
            shutil.rmtree(o.out)
        stage.rename(o.out)
        return ExportResult(o.out, load_bundle(o.out), parity, dict((bundle.calibration or {}).get("per_class", {})))
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _merged_parity(stage: Path, samples: SampleSet, results: list[Any], report: dict[str, Any]) -> dict[str, Any]:
    """The bundle's parity.json with the CPU comparisons added (replacing earlier ones of the same name)."""
    path = stage / "parity.json"
    parity: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    parity.setdefault("images", {"count": len(samples), "source": samples.source})
    comparisons = {k: v for k, v in parity.get("comparisons", {}).items() if k not in CPU_COMPARISONS}
    parity["comparisons"] = comparisons  # an earlier CPU comparison is gone with the model it measured
    for r in results:
        comparisons[r.name] = {**r.to_json(), "images": {"count": len(samples), "source": samples.source}}
    parity["cpu_precisions"] = report
    parity["passed"] = all(c.get("passed", False) for c in comparisons.values())
    path.write_text(json.dumps(parity, indent=2) + "\n", encoding="utf-8")
    return parity


def _added(o: AddPrecisionsOptions, source_version: str) -> dict[str, Any]:
    opts = {k: (v.name if isinstance(v, Path) else v) for k, v in asdict(o).items()}  # names, never host paths
    return {"from_version": source_version, "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "tools": cpu_tools(), "options": opts}  # fmt: skip
