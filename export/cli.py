"""``aoi export``: a training checkpoint -> a servable model bundle (ONNX, parity report, thresholds, engine).

``--weights`` takes our checkpoints and Ultralytics ``best.pt`` files; ``--onnx`` wraps an Ultralytics ONNX export.

No torch at module level (``aoi --help`` must work in the torch-free runtime image); see docs/export.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from export.cpu_step import CpuPrecisionOptions
    from export.pipeline import ExportResult

__all__ = ["add_arguments", "run"]

_STEPS_BASE = 6  # load, ONNX, images, parity, thresholds, bundle
_STEPS_ONNX = 5  # read ONNX, images, onnxruntime, thresholds, bundle


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``aoi export``'s flags in --help order: source, model, calibration, bundle, --overwrite / --quiet, tiling."""
    _add_source_arguments(parser)
    _add_model_arguments(parser)
    _add_calibration_arguments(parser)
    _add_bundle_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory at --out")
    parser.add_argument("--quiet", action="store_true", help="no progress lines, only the summary")
    _add_tiling_arguments(parser)


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """What to export (--weights / --onnx / --from-bundle, exactly one) and where the bundle goes (--out)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--weights", type=Path, help="checkpoint: a .pt from aoi train, or an Ultralytics YOLO11/YOLOv8 detect best.pt"
    )
    source.add_argument(
        "--onnx", type=Path, help="an Ultralytics-exported detection .onnx to wrap as it is (docs/byom.md)"
    )
    source.add_argument(
        "--from-bundle",
        type=Path,
        metavar="DIR",
        help="add --int8 / --bf16 to an existing bundle (no checkpoint needed; its ONNX is the fp32 reference), or "
        "convert it with --uint8-input",
    )
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to create")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The exported model's input, opset and batch range, and the optional TensorRT engine build."""
    parser.add_argument("--imgsz", type=int, default=None, help="input side, multiple of 32 (default: checkpoint)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 17 (default 17)")
    parser.add_argument("--max-batch", type=int, default=16, help="largest batch the bundle serves (default 16)")
    parser.add_argument("--opt-batch", type=int, default=None, help="typical batch, TensorRT tunes for it (default 4)")
    parser.add_argument("--engine", action="store_true", help="also build a TensorRT FP16 engine (GPU + TensorRT 10)")
    parser.add_argument("--timing-cache", type=Path, default=None, help="TensorRT timing cache, reused across builds")
    parser.add_argument("--workspace-mib", type=int, default=2048, help="TensorRT builder workspace (default 2048 MiB)")


def _add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    """The calibration images (parity, mAP) and how per-class score thresholds are chosen on them."""
    parser.add_argument(
        "--calibrate-data",
        type=Path,
        default=None,
        help="VOC folder or YOLO data.yaml for parity/mAP and per-class thresholds "
        "(without it: synthetic parity images, default threshold 0.25)",
    )
    parser.add_argument("--split", default="val", help="split of --calibrate-data (default val)")
    add_threshold_rule(parser, "recall")


def add_threshold_rule(parser: argparse.ArgumentParser, recall: str) -> None:
    """``--target-recall R`` or ``--mode f1``: how each class's threshold is chosen (export/calibrate.py);
    ``recall`` says over what the recall is counted."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--target-recall",
        type=float,
        default=None,
        metavar="R",
        help=f"per class, the highest threshold whose {recall} >= R (0 < R <= 1)",
    )
    mode.add_argument("--mode", choices=["f1"], default=None, help="per class, the best-F1 threshold (default)")


def _add_bundle_arguments(parser: argparse.ArgumentParser) -> None:
    """The bundle's name and version, and the precisions it carries besides ONNX fp32 (FP16 ONNX, INT8, BF16)."""
    parser.add_argument("--name", default=None, help="bundle name (default <arch>.<dataset>.fp32)")
    parser.add_argument("--version", default=None, help="bundle version (default <date>-<checkpoint sha256[:8]>)")
    parser.add_argument("--fp16-onnx", action="store_true", help="also write model.fp16.onnx with its own parity")
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also write INT8 models calibrated on --calibrate-data: model.int8.onnx for ONNX Runtime CPU (static QDQ, "
        "decode, level branches and stem in fp32) and model.int8.xml/.bin for OpenVINO (NNCF); one beyond a 1.0 pt "
        "mAP50 drop is dropped, the export is refused when both are; implies --bf16",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="measure OpenVINO BF16 (no file); refused when mAP50 drops more than 0.5 pt",
    )
    parser.add_argument(
        "--uint8-input",
        action="store_true",
        help="with --from-bundle: a copy whose models take uint8 NHWC pixels and normalise them in the graph "
        "(new version, schema 2; parity vs the float models checked)",
    )


def _add_tiling_arguments(parser: argparse.ArgumentParser) -> None:
    """The bundle's tiling of frames larger than the model's native field (its own --help group)."""
    tiling = parser.add_argument_group("tiling of frames larger than the model's native field (docs/service.md)")
    scale = tiling.add_mutually_exclusive_group()
    scale.add_argument(
        "--native-tile",
        type=int,
        default=None,
        metavar="PX",
        help="frame pixels one model input covers (default: from the training images' size)",
    )
    scale.add_argument(
        "--native-scale",
        type=float,
        default=None,
        metavar="S",
        help="model-input pixels per frame pixel, e.g. 1.28 (default: from the training images)",
    )
    tiling.add_argument(
        "--tiling",
        choices=["auto", "on", "off"],
        default="auto",
        help="the bundle's tiling mode (default auto: tile frames larger than the native field)",
    )
    tiling.add_argument(
        "--tile-overlap",
        type=float,
        default=0.25,
        metavar="F",
        help="minimum overlap of neighbouring tiles, fraction of a tile side (default 0.25)",
    )
    tiling.add_argument(
        "--full-frame",
        action="store_true",
        help="tiled frames also get one whole-frame pass (defects larger than a tile)",
    )


def _cpu_options(args: argparse.Namespace) -> CpuPrecisionOptions:
    """--int8 / --bf16 (INT8 implies measuring BF16 too: both are choices of the OpenVINO backend)."""
    from export.cpu_step import CpuPrecisionOptions

    return CpuPrecisionOptions(int8=args.int8, bf16=args.bf16 or args.int8)


def _add_precisions(args: argparse.Namespace) -> int:
    from export.from_bundle import AddPrecisionsOptions, run_add_precisions
    from export.report import Progress

    if args.calibrate_data is None:
        print("aoi export: error: --from-bundle: needs --calibrate-data (the images the precisions are measured on)",
              file=sys.stderr)  # fmt: skip
        return 2
    opts = AddPrecisionsOptions(
        source=args.from_bundle,
        out=args.out,
        calibrate_data=args.calibrate_data,
        split=args.split,
        cpu=_cpu_options(args),
        version=args.version,
        overwrite=args.overwrite,
    )
    return _report(lambda: run_add_precisions(opts, Progress(total=4, quiet=args.quiet)))


def _uint8_input(args: argparse.Namespace) -> int:
    from export.report import Progress
    from export.uint8_input import Uint8InputOptions, run_uint8_input

    if args.from_bundle is None or args.int8 or args.bf16:
        print("aoi export: error: --uint8-input converts an existing bundle: pass --from-bundle DIR alone (export "
              "it and add --int8 / --bf16 first)", file=sys.stderr)  # fmt: skip
        return 2
    opts = Uint8InputOptions(args.from_bundle, args.out, version=args.version, overwrite=args.overwrite)
    return _report(lambda: run_uint8_input(opts, Progress(total=4, quiet=args.quiet)))


def _report(export: Callable[[], ExportResult]) -> int:
    """Run ``export`` and print its summary; an error is one line naming the file and problem, exit 2 (or 1)."""
    from export.pipeline import ExportError
    from export.report import format_summary

    try:
        result = export()
    except ExportError as exc:
        print(f"aoi export: error: {exc}", file=sys.stderr)
        return exc.code
    except ValueError as exc:  # bad option values caught by the library layers (opset, dataset files, ...)
        print(f"aoi export: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(result.root, result.parity, result.thresholds))
    for note in result.notes:
        print(f"note: {note}")
    return 0


def run(args: argparse.Namespace) -> int:
    from export.onnx_import import wrap_onnx
    from export.pipeline import ExportOptions, run_export
    from export.report import Progress

    if args.uint8_input:
        return _uint8_input(args)
    if args.from_bundle is not None:
        return _add_precisions(args)
    if args.onnx is not None and (args.int8 or args.bf16):
        print("aoi export: error: --onnx with --int8 / --bf16: wrap the ONNX first, then add the precisions to that "
              "bundle with --from-bundle", file=sys.stderr)  # fmt: skip
        return 2

    if args.target_recall is not None and not 0.0 < args.target_recall <= 1.0:
        print(f"aoi export: error: --target-recall: must be in (0, 1], got {args.target_recall}", file=sys.stderr)
        return 2
    opts = ExportOptions(
        weights=args.onnx if args.onnx is not None else args.weights,
        out=args.out,
        imgsz=args.imgsz,
        opset=args.opset,
        max_batch=args.max_batch,
        opt_batch=args.opt_batch,
        engine=args.engine,
        calibrate_data=args.calibrate_data,
        split=args.split,
        mode="recall" if args.target_recall is not None else "f1",
        target_recall=args.target_recall if args.target_recall is not None else 0.9,
        name=args.name,
        version=args.version,
        fp16_onnx=args.fp16_onnx,
        overwrite=args.overwrite,
        timing_cache=args.timing_cache,
        workspace_mib=args.workspace_mib,
        native_tile=args.native_tile,
        native_scale=args.native_scale,
        tiling=args.tiling,
        tile_overlap=args.tile_overlap,
        full_frame=args.full_frame,
        cpu=_cpu_options(args),
    )
    cpu_steps = int(args.int8 or args.bf16)
    total = _STEPS_ONNX if args.onnx is not None else _STEPS_BASE + int(args.fp16_onnx) + int(args.engine) + cpu_steps
    progress = Progress(total=total, quiet=args.quiet)
    return _report(lambda: wrap_onnx(opts, progress) if args.onnx is not None else run_export(opts, progress))
