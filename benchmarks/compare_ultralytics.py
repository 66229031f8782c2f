"""Same weights, same numbers: score Ultralytics' detections and ours on one ground truth with pycocotools.

Inputs are files, never ultralytics (it is not a dependency): ``--ultralytics-json`` is Ultralytics' predictions on
the split as a COCO result list (``image_id`` = file stem, ``category_id`` = 0-based class index, ``bbox`` = x, y, w,
h in 0-based original pixels, ``score``; docs/byom.md shows the few lines of Ultralytics code that write it), and ours
come from ``--bundle`` (run here through ``aoi val``, the service's backend and post-processing) or ``--ours-json``
(``aoi val --save-coco``). The ground truth is our dataset reader's (VOC corners minus 1, as in train/dataset.py).

    python -m benchmarks.compare_ultralytics --data NEU-DET --ultralytics-json ultra.json --bundle bundles/y11n
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from train.dataset import DatasetSplit, load_split

__all__ = ["coco_ground_truth", "main", "score"]


def coco_ground_truth(split: DatasetSplit) -> dict[str, Any]:
    """The split as a COCO dataset dict; image ids are the record stems."""
    annotations: list[dict[str, Any]] = []
    for record in split.records:
        for box, c in zip(record.boxes_xyxy.astype(float).tolist(), record.class_ids.tolist(), strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            ann = {"image_id": record.stem, "category_id": int(c), "bbox": [box[0], box[1], w, h], "area": w * h}
            annotations.append({**ann, "id": len(annotations) + 1, "iscrowd": 0})
    return {
        "images": [{"id": r.stem, "width": r.width, "height": r.height} for r in split.records],
        "annotations": annotations,
        "categories": [{"id": k, "name": n} for k, n in enumerate(split.class_names)],
    }


def score(ground_truth: dict[str, Any], detections: list[dict[str, Any]]) -> dict[str, float]:
    """pycocotools' bbox mAP50-95 and mAP50 (maxDets 100) of ``detections`` on ``ground_truth``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    known = {img["id"] for img in ground_truth["images"]}
    unknown = sorted({str(d["image_id"]) for d in detections} - known)
    if unknown:
        raise ValueError(f"{len(unknown)} detection image_ids are not file stems of the split, e.g. {unknown[:3]}")
    if not detections:  # pycocotools cannot load an empty result list
        return {"map50_95": 0.0, "map50": 0.0, "detections": 0}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes([{**d, "image_id": str(d["image_id"])} for d in detections]), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map50_95": float(ev.stats[0]), "map50": float(ev.stats[1]), "detections": len(detections)}


def _ours(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.ours_json is not None:
        return list(json.loads(args.ours_json.read_text(encoding="utf-8")))
    from aoi.cli import main as aoi_main

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ours.json"
        argv = ["val", "--model", str(args.bundle), "--data", str(args.data), "--split", args.split, "--save-coco",
                str(out), "--batch", str(args.batch)]  # fmt: skip
        if aoi_main(argv) != 0:
            raise SystemExit(f"aoi val failed on {args.bundle}")
        return list(json.loads(out.read_text(encoding="utf-8")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="VOC folder or YOLO data.yaml (the ground truth)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--ultralytics-json", type=Path, required=True, help="Ultralytics predictions, COCO results")
    ours = parser.add_mutually_exclusive_group(required=True)
    ours.add_argument("--bundle", type=Path, help="our bundle, run through `aoi val` here")
    ours.add_argument("--ours-json", type=Path, help="our detections from `aoi val --save-coco`")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None, help="also write the comparison here")
    args = parser.parse_args(argv)
    gt = coco_ground_truth(load_split(args.data, args.split))
    ultra = list(json.loads(args.ultralytics_json.read_text(encoding="utf-8")))
    rows = {"ultralytics": score(gt, ultra), "ours": score(gt, _ours(args))}
    delta = 100 * (rows["ours"]["map50"] - rows["ultralytics"]["map50"])
    print(f"{'pipeline':<12}{'mAP50':>8}{'mAP50-95':>10}{'detections':>12}   (pycocotools, {len(gt['images'])} images)")
    for name, r in rows.items():
        print(f"{name:<12}{r['map50']:>8.4f}{r['map50_95']:>10.4f}{r['detections']:>12}")
    print(f"mAP50 difference (ours - ultralytics): {delta:+.2f} pt")
    if args.json is not None:
        args.json.write_text(json.dumps({**rows, "delta_map50_pt": delta}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
