"""``aoi val``: COCO-protocol evaluation of a torch checkpoint or an exported bundle on a dataset split.

A bundle is run through the service's own backend (``service.backends.load_backend``), letterbox and
post-processing, so the number printed is the served model's number. No torch import at module level (CONTRACTS):
evaluating a bundle needs no torch at all.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from service.core.postprocess import Detections
    from train.dataset import DatasetSplit
    from train.evaluate import EvalResult

__all__ = ["add_arguments", "format_table", "run", "to_coco_detections"]


class _UsageError(Exception):
    """Bad input from the user: ``aoi val: error: <path>: <problem>`` and exit code 2."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="checkpoint (.pt) or bundle directory")
    parser.add_argument("--data", required=True, type=Path, help="VOC folder, folder with data.yaml, or a data YAML")
    parser.add_argument("--split", default="val", help="split to evaluate (default: val)")
    parser.add_argument("--imgsz", type=int, default=None, help="input size (default: the checkpoint's / bundle's)")
    parser.add_argument("--batch", type=int, default=16, help="images per inference batch (default: 16)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument(
        "--backend",
        default=None,
        help="bundle runtime: auto, tensorrt, onnxruntime-cuda, onnxruntime-cpu (default: onnxruntime-cpu on cpu, "
        "auto on cuda)",
    )
    parser.add_argument(
        "--tiling",
        choices=("auto", "on", "off"),
        default=None,
        help="bundle: tile frames as the service does (default: the bundle's mode, auto: frames larger than the "
        "model's native field are tiled)",
    )
    parser.add_argument(
        "--native-tile", type=int, default=None, help="bundle: frame pixels per model input (overrides the bundle's)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the metrics as JSON here")
    parser.add_argument("--save-coco", type=Path, default=None, help="write COCO-format detections here")
    parser.add_argument("--plots", type=Path, default=None, help="write PR/F1 curves, confusion matrix, AP bars here")


def run(args: argparse.Namespace) -> int:
    from service.core.bundle import BundleError
    from service.core.errors import BackendUnavailable
    from train.dataset import DatasetError

    try:
        return _run(args)
    except (DatasetError, BundleError, _UsageError) as exc:
        sys.stderr.write(f"aoi val: error: {exc}\n")
        return 2
    except BackendUnavailable as exc:
        sys.stderr.write(f"aoi val: error: {args.model}: backend unavailable: {exc}\n")
        return 1
    except ValueError as exc:  # models.CheckpointError is a ValueError naming the file; so are shape mismatches
        sys.stderr.write(f"aoi val: error: {exc}\n")
        return 2


def _run(args: argparse.Namespace) -> int:
    from train.dataset import load_split
    from train.evaluate import evaluate_detections

    if args.batch < 1:
        raise _UsageError("--batch", f"must be >= 1, got {args.batch}")
    if not args.model.exists():
        raise _UsageError(args.model, "model not found (expected a checkpoint file or a bundle directory)")
    split = load_split(args.data, args.split)
    is_bundle = args.model.is_dir() or args.model.name == "bundle.json"
    predict = _bundle_predictor(args) if is_bundle else _checkpoint_predictor(args)
    started = time.perf_counter()
    preds = predict(split)
    elapsed = time.perf_counter() - started
    result = evaluate_detections(preds, split)
    print(format_table(result))
    print(f"{len(split.records)} images in {elapsed:.1f} s ({1e3 * elapsed / max(len(split.records), 1):.1f} ms/image)")
    if args.json:
        _write(args.json, json.dumps(result.to_json(), indent=2) + "\n")
    if args.save_coco:
        _write(args.save_coco, json.dumps(to_coco_detections(preds, split)) + "\n")
    if args.plots:
        from train.plots import plot_eval

        plot_eval(result, args.plots)
    return 0


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _check_classes(model_path: Path, model_names: Sequence[str], split: DatasetSplit) -> None:
    if list(model_names) != list(split.class_names):
        raise _UsageError(
            model_path,
            f"model classes {list(model_names)} differ from the dataset's {split.class_names} "
            "(same names in the same order are required)",
        )


def _checkpoint_predictor(args: argparse.Namespace) -> Callable[[DatasetSplit], list[Detections]]:
    import torch

    from models import load_checkpoint
    from train.predict import predict_split, torch_infer

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _UsageError("--device", f"{args.device} requested but torch sees no CUDA device")
    model, ckpt = load_checkpoint(args.model, map_location=device)
    imgsz = int(args.imgsz or ckpt["imgsz"])
    if imgsz % 32:
        raise _UsageError("--imgsz", f"must be a multiple of 32, got {imgsz}")

    def predict(split: DatasetSplit) -> list[Detections]:
        _check_classes(args.model, ckpt["class_names"], split)
        from service.core.offline import CountProgress

        progress = CountProgress("aoi val: images", len(split.records))
        return predict_split(
            torch_infer(model, device), split, input_hw=(imgsz, imgsz), batch_size=args.batch,
            progress=lambda done, _total: progress(done),
        )  # fmt: skip

    return predict


def _bundle_predictor(args: argparse.Namespace) -> Callable[[DatasetSplit], list[Detections]]:
    from service.backends import load_backend
    from service.core.bundle import PostprocessSpec, load_bundle
    from service.core.errors import ServiceError
    from service.core.frames import TilingSettings, resolve_policy
    from service.core.offline import CountProgress, FrameInspector
    from train.predict import EVAL_CONF, EVAL_IOU, EVAL_MAX_DET

    root = args.model.parent if args.model.name == "bundle.json" else args.model
    bundle = load_bundle(root)
    hw = (bundle.input.height, bundle.input.width)
    if args.imgsz and (args.imgsz, args.imgsz) != hw:
        raise _UsageError("--imgsz", f"the bundle's input is fixed at {hw[1]}x{hw[0]}, got {args.imgsz}")
    if args.native_tile is not None and args.native_tile < 1:
        raise _UsageError("--native-tile", f"must be >= 1 frame pixels, got {args.native_tile}")
    policy = resolve_policy(bundle, TilingSettings(native_tile=args.native_tile), args.tiling)
    device = str(args.device)
    kind = args.backend or ("onnxruntime-cpu" if device == "cpu" else "auto")
    device_id = int(device.split(":")[1]) if device.startswith("cuda:") else 0
    backend = load_backend(kind, bundle, device_id=device_id, max_batch_size=args.batch).backend
    protocol = PostprocessSpec(score_thresholds={}, nms_iou=EVAL_IOU, max_detections=EVAL_MAX_DET)
    inspector = FrameInspector(
        bundle, backend, policy, np.full(bundle.nc, EVAL_CONF, np.float32), postprocess_spec=protocol,
        batch_size=args.batch,
    )  # fmt: skip

    def frames(split: DatasetSplit) -> Iterator[tuple[str, bytes]]:
        for record in split.records:
            try:
                yield str(record.path), record.path.read_bytes()
            except OSError as exc:
                raise _UsageError(record.path, f"cannot read image: {exc.strerror or exc}") from exc

    def predict(split: DatasetSplit) -> list[Detections]:
        _check_classes(root, bundle.classes, split)
        progress = CountProgress("aoi val: images", len(split.records))

        def refuse(key: str, exc: ServiceError) -> None:  # an image the service would refuse: the file and why
            raise _UsageError(key, exc.message) from exc

        try:
            out = list(inspector.run(frames(split), progress, on_error=refuse))
        finally:
            backend.close()
        tiled = sum(f.tiled for f in out)
        if tiled:
            tiles = sum(f.tiles for f in out)
            sys.stderr.write(f"tiling: {tiled} of {len(out)} images tiled ({tiles} model inputs; {policy.source})\n")
        return [f.detections for f in out]

    return predict


def to_coco_detections(preds: Sequence[Detections], split: DatasetSplit) -> list[dict[str, Any]]:
    """COCO result list: ``image_id`` = file stem, ``category_id`` = class index, ``bbox`` = [x, y, w, h] in
    0-based original pixels, ``score``."""
    out: list[dict[str, Any]] = []
    for det, record in zip(preds, split.records, strict=True):
        for box, score, cls in zip(det.boxes_xyxy.tolist(), det.scores.tolist(), det.class_ids.tolist(), strict=True):
            x1, y1, x2, y2 = box
            bbox = [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)]
            out.append({"image_id": record.stem, "category_id": int(cls), "bbox": bbox, "score": round(score, 5)})
    return out


def _fmt(value: float | None) -> str:
    return "    -" if value is None else f"{value:.3f}"


def format_table(result: EvalResult) -> str:
    """Per-class table (instances, P, R, AP50, AP50-95), the 'all' row, and AP by object size."""
    width = max(12, *(len(n) for n in result.class_names)) + 2
    head = f"{'class':<{width}}{'images':>8}{'instances':>11}{'P':>8}{'R':>8}{'AP50':>8}{'AP50-95':>9}"
    rows = [head, "-" * len(head)]
    rows.append(
        f"{'all':<{width}}{result.num_images:>8}{result.num_instances:>11}{result.precision:>8.3f}"
        f"{result.recall:>8.3f}{result.map50:>8.3f}{result.map50_95:>9.3f}"
    )
    for name, s in result.per_class.items():
        rows.append(
            f"{name:<{width}}{s['images']:>8}{s['instances']:>11}{s['precision']:>8.3f}{s['recall']:>8.3f}"
            f"{_fmt(s['ap50']):>8}{_fmt(s['ap50_95']):>9}"
        )
    counts = result.area_instances
    rows.append(
        f"AP50-95 by size: small {_fmt(result.ap_small)} ({counts['small']}), medium {_fmt(result.ap_medium)} "
        f"({counts['medium']}), large {_fmt(result.ap_large)} ({counts['large']})"
    )
    rows.append(f"P/R/F1 at confidence {result.conf_at_best_f1:.3f} (best mean F1 {result.f1:.3f})")
    return "\n".join(rows)
