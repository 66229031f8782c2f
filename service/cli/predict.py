"""``aoi predict``: run a bundle over a folder of images offline, tiled exactly as the service tiles them, and write
one JSON line per image plus annotated pictures of the NG frames. No torch, no HTTP: the service's own steps
(:mod:`service.core.offline`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.settings import BACKEND_KINDS

if TYPE_CHECKING:
    from service.core.backend import InferenceBackend
    from service.core.bundle import ModelBundle
    from service.core.errors import ServiceError
    from service.core.offline import FrameInspector

__all__ = ["add_arguments", "run"]

_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=Path("bundles/default"), help="bundle (default bundles/default)")
    parser.add_argument("--source", type=Path, required=True, help="an image file or a folder of images (recursive)")
    parser.add_argument("--out", type=Path, required=True, help="folder for predictions.jsonl, summary.json, ng/")
    parser.add_argument("--tiling", choices=("auto", "on", "off"), default=None, help="default: the bundle's mode")
    parser.add_argument("--native-tile", type=int, default=None, help="frame pixels per model input (override)")
    parser.add_argument("--full-frame", action="store_true", default=None, help="add a whole-frame pass to tiles")
    parser.add_argument("--backend", choices=BACKEND_KINDS, default="onnxruntime-cpu", help="default onnxruntime-cpu")
    parser.add_argument("--batch", type=int, default=8, help="model inputs per inference batch (default 8)")
    parser.add_argument("--save-ok", action="store_true", help="also write annotated OK frames (ok/)")
    parser.add_argument("--no-images", action="store_true", help="write only the JSON results")


def _error(message: str) -> int:
    sys.stderr.write(f"aoi predict: error: {message}\n")
    return 2


def _images(source: Path, out: Path) -> list[Path]:
    """Image files under ``source`` (recursive, sorted), leaving out ``out`` when it lies inside (earlier results)."""
    if source.is_file():
        return [source]
    out = out.resolve()
    return sorted(
        p
        for p in source.rglob("*")
        if p.is_file() and p.suffix.lower() in _SUFFIXES and not p.resolve().is_relative_to(out)
    )


def _read(paths: list[Path], refuse: Callable[[str, str, str], None]) -> Iterator[tuple[str, bytes]]:
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            refuse(str(path), "unreadable_file", f"cannot read: {exc.strerror or exc}")
            continue
        yield str(path), data


@dataclass
class _Tally:
    """What the inspect loop counts: verdicts, detections per class, model inputs, and the files that failed."""

    failed: dict[str, str] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    verdicts: Counter[str] = field(default_factory=Counter)
    tiles: int = 0

    def add(self, line: dict[str, Any], tiles: int) -> None:
        """Count one inspected image (its JSON line) and the model inputs it took."""
        self.verdicts[line["verdict"]] += 1
        self.counts.update(d["class_name"] for d in line["detections"])
        self.tiles += tiles


def run(args: argparse.Namespace) -> int:
    """Inspect every image under --source with the bundle: exit 0, 1 when an image failed, 2 on a bad argument."""
    if (problem := _check(args)) is not None:
        return _error(problem)
    paths = _images(args.source, args.out)
    if not paths:
        return _error(f"{args.source}: no images ({', '.join(_SUFFIXES)})")
    loaded = _load(args)
    if isinstance(loaded, str):
        return _error(loaded)
    bundle, backend = loaded
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _error(f"{args.out}: cannot create the output folder ({exc.strerror or exc})")
    inspector = _inspector(args, bundle, backend)
    started = time.perf_counter()
    tally = _inspect(args, paths, inspector)
    elapsed = time.perf_counter() - started
    summary = _write_summary(args.out, paths, inspector, tally, elapsed)
    print(f"{summary['inspected']} images ({tally.verdicts['NG']} NG, {tally.verdicts['OK']} OK, {tally.tiles} model "
          f"inputs) in {elapsed:.1f} s -> {args.out}/predictions.jsonl")  # fmt: skip
    for key, problem in tally.failed.items():
        sys.stderr.write(f"aoi predict: error: {key}: {problem}\n")
    return 1 if tally.failed else 0


def _check(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments (a missing source, a batch or native tile below 1), None when none."""
    if not args.source.exists():
        return f"{args.source}: no such file or folder"
    if args.batch < 1:
        return f"--batch: must be >= 1, got {args.batch}"
    if args.native_tile is not None and args.native_tile < 1:
        return f"--native-tile: must be >= 1 frame pixels, got {args.native_tile}"
    return None


def _load(args: argparse.Namespace) -> tuple[ModelBundle, InferenceBackend] | str:
    """Load the bundle at --model and its --backend; the problem instead when either cannot be loaded."""
    from service.backends import load_backend
    from service.core.bundle import BundleError, load_bundle
    from service.core.errors import BackendUnavailable

    try:
        bundle = load_bundle(args.model)
        backend = load_backend(args.backend, bundle, max_batch_size=args.batch).backend
    except BundleError as exc:
        return f"{exc.path}: {exc.problem}"
    except BackendUnavailable as exc:
        return f"{args.model}: backend unavailable: {exc}"
    return bundle, backend


def _inspector(args: argparse.Namespace, bundle: ModelBundle, backend: InferenceBackend) -> FrameInspector:
    """The frame inspector: the tiling in force (--tiling, --native-tile, --full-frame over the bundle's) and the
    bundle's score thresholds."""
    import numpy as np

    from service.core.frames import TilingSettings, resolve_policy
    from service.core.offline import FrameInspector

    policy = resolve_policy(
        bundle, TilingSettings(native_tile=args.native_tile, full_frame=args.full_frame), args.tiling
    )
    return FrameInspector(bundle, backend, policy, np.asarray(bundle.thresholds(), np.float32), batch_size=args.batch)


def _inspect(args: argparse.Namespace, paths: list[Path], inspector: FrameInspector) -> _Tally:
    """Inspect every image: one line each (its result or its error) in predictions.jsonl, annotated NG (and with
    --save-ok, OK) frames; closes the backend."""
    from service.core.offline import CountProgress

    tally = _Tally()
    bundle = inspector.bundle
    with (args.out / "predictions.jsonl").open("w", encoding="utf-8") as out:
        unreadable: list[str] = []  # files skipped before the inspector saw them (its count does not include them)

        def refuse(key: str, code: str, message: str) -> None:
            tally.failed[key] = message
            out.write(json.dumps({"file": key, "error": code, "message": message}) + "\n")
            if code == "unreadable_file":
                unreadable.append(key)

        def refused(key: str, exc: ServiceError) -> None:
            refuse(key, exc.code, exc.message)

        count = CountProgress("aoi predict: images", len(paths))
        try:
            frames = _read(paths, refuse)
            for frame in inspector.run(frames, lambda n: count(n + len(unreadable)), on_error=refused):
                line = _record(frame, bundle.classes, bundle.verdict)
                out.write(json.dumps(line) + "\n")
                tally.add(line, frame.tiles)
                if not args.no_images and (line["verdict"] == "NG" or args.save_ok):
                    _annotate(Path(frame.key), args.out / line["verdict"].lower(), line, args.source)
        finally:
            inspector.backend.close()
        count.finish()
    return tally


def _write_summary(
    out: Path, paths: list[Path], inspector: FrameInspector, tally: _Tally, elapsed: float
) -> dict[str, Any]:
    """Write summary.json (model, tiling, counts, failures, time) into ``out``; its content."""
    policy = inspector.policy
    summary: dict[str, Any] = {
        "model": {"name": inspector.bundle.name, "version": inspector.bundle.version},
        "tiling": {
            "mode": policy.mode,
            "tile": list(policy.tile_size()),
            "overlap": policy.overlap,
            "source": policy.source,
        },
        "images": len(paths),
        "inspected": sum(tally.verdicts.values()),
        "verdicts": dict(tally.verdicts),
        "detections_per_class": dict(tally.counts),
        "model_inputs": tally.tiles,
        "failed": tally.failed,
        "seconds": round(elapsed, 3),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _record(frame: Any, names: list[str], rule: Any) -> dict[str, Any]:
    from service.core.postprocess import verdict

    d = frame.detections
    return {
        "file": frame.key,
        "width": frame.width,
        "height": frame.height,
        "verdict": verdict(d, rule, names),
        "tiled": frame.tiled,
        "tiles": frame.tiles,
        "detections": [
            {"class_id": c, "class_name": names[c], "score": round(s, 5), "box_xyxy": [round(v, 2) for v in b]}
            for b, s, c in zip(d.boxes_xyxy.tolist(), d.scores.tolist(), d.class_ids.tolist(), strict=True)
        ],
        "decode_ms": round(frame.decode_s * 1e3, 2),
    }


def _annotate(path: Path, folder: Path, line: dict[str, Any], source: Path) -> None:
    """Write ``path`` with its boxes drawn to ``folder`` (keeping the sub-folder under ``source``), as JPEG."""
    import cv2
    import numpy as np

    image = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        return
    thick = max(1, round(max(image.shape[:2]) / 1200))
    for det in line["detections"]:
        x1, y1, x2, y2 = (round(v) for v in det["box_xyxy"])
        colour = _COLOURS[det["class_id"] % len(_COLOURS)]
        cv2.rectangle(image, (x1, y1), (x2, y2), colour, thick)
        label = f"{det['class_name']} {det['score']:.2f}"
        cv2.putText(image, label, (x1, max(y1 - 3 * thick, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick, colour, 1)
    rel = path.relative_to(source) if source.is_dir() else Path(path.name)
    # a.png and a.jpg in one folder must not overwrite each other: keep the original name, add .jpg when needed
    target = folder / rel if rel.suffix.lower() in (".jpg", ".jpeg") else folder / rel.parent / (rel.name + ".jpg")
    target.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(target), image, [cv2.IMWRITE_JPEG_QUALITY, 90])


_COLOURS = [(56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207), (10, 249, 72)]  # BGR
