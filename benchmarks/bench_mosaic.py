"""Accuracy on line-camera-sized frames: NEU-DET val images placed side by side at their native scale, POSTed to the
service as one JPEG each, scored against the shifted ground truth with the served thresholds.

    python benchmarks/bench_mosaic.py --data /path/to/NEU-DET --bundle bundles/default --grids 1x1,2x2,4x4,12x10

For every grid (columns x rows) the val images are shuffled once (``--seed``) and cut into frames of cols*rows images;
1x1 sends each original file as it is. Each frame goes through the real service (``create_app`` with the bundle's
ONNX Runtime backend, in-process over ASGI) with ``tiling=auto`` and, for comparison, ``tiling=off`` (the whole frame
letterboxed, as before tiling existed). Printed per grid and mode: served recall at IoU 0.5, mAP50 of the served
detections (they are already thresholded), duplicates (detections matching a defect already matched at IoU 0.5: a
defect cut by a tile border found twice counts here), tiles per frame and milliseconds per frame.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
from asgi_lifespan import LifespanManager

from service.core.postprocess import Detections
from service.http.app import create_app
from service.settings import Settings
from train.dataset import DatasetSplit, ImageRecord, load_split
from train.evaluate import box_iou, evaluate_detections


@dataclass(frozen=True)
class Mosaic:
    data: bytes  # JPEG (or the original file for 1x1)
    record: ImageRecord  # shifted ground truth in frame pixels


def _grids(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        cols, rows = part.lower().split("x")
        out.append((int(cols), int(rows)))
    return out


def make_mosaics(split: DatasetSplit, cols: int, rows: int, seed: int, quality: int, fmt: str = "jpg") -> list[Mosaic]:
    """Frames of ``cols x rows`` val images each at native scale (cells of the largest image size), encoded as
    ``fmt`` (jpg at ``quality``, or lossless png)."""
    order = np.random.default_rng(seed).permutation(len(split.records))
    per = cols * rows
    if per == 1:
        return [Mosaic(split.records[i].path.read_bytes(), split.records[i]) for i in order]
    cw = max(r.width for r in split.records)
    ch = max(r.height for r in split.records)
    frames = []
    for f in range(len(order) // per):
        canvas = np.zeros((rows * ch, cols * cw), np.uint8)
        boxes, classes = [], []
        for k, idx in enumerate(order[f * per : (f + 1) * per]):
            rec = split.records[idx]
            img = cv2.imread(str(rec.path), cv2.IMREAD_GRAYSCALE)  # NEU-DET is mono steel: the frame stays mono
            assert img is not None, f"cannot read {rec.path}"
            x0, y0 = (k % cols) * cw, (k // cols) * ch
            canvas[y0 : y0 + rec.height, x0 : x0 + rec.width] = img
            boxes.append(rec.boxes_xyxy + np.array([x0, y0, x0, y0], np.float32))
            classes.append(rec.class_ids)
        ok, buf = cv2.imencode(f".{fmt}", canvas, [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt == "jpg" else [])
        assert ok
        record = ImageRecord(
            path=Path(f"mosaic-{cols}x{rows}-{f}.{fmt}"), width=cols * cw, height=rows * ch,
            boxes_xyxy=np.concatenate(boxes).astype(np.float32), class_ids=np.concatenate(classes).astype(np.int64),
            stem=f"mosaic-{cols}x{rows}-{f}",
        )  # fmt: skip
        frames.append(Mosaic(buf.tobytes(), record))
    return frames


def served_recall(preds: list[Detections], records: list[ImageRecord], iou: float = 0.5) -> tuple[float, int, int]:
    """(recall, matched, duplicates): greedy by score, same class, IoU >= ``iou``; a detection whose best defect is
    already matched counts as a duplicate."""
    matched = dup = total = 0
    for det, rec in zip(preds, records, strict=True):
        total += len(rec.class_ids)
        if len(det) == 0 or len(rec.class_ids) == 0:
            continue
        ious = box_iou(det.boxes_xyxy.astype(np.float64), rec.boxes_xyxy.astype(np.float64))
        ious[det.class_ids[:, None] != rec.class_ids[None, :]] = 0.0
        taken = np.zeros(len(rec.class_ids), bool)
        for d in np.argsort(-det.scores, kind="stable"):
            cand = np.where(ious[d] >= iou)[0]
            if cand.size == 0:
                continue
            free = cand[~taken[cand]]
            if free.size:
                taken[free[np.argmax(ious[d, free])]] = True
                matched += 1
            else:
                dup += 1
    return matched / max(total, 1), matched, dup


async def _post_all(
    client: httpx.AsyncClient, frames: list[Mosaic], tiling: str, concurrency: int
) -> list[dict[str, Any]]:
    sem = asyncio.Semaphore(concurrency)

    async def one(m: Mosaic) -> dict[str, Any]:
        async with sem:
            headers = {"content-type": "image/png" if m.record.path.suffix == ".png" else "image/jpeg"}
            r = await client.post(f"/v1/inspect?tiling={tiling}", content=m.data, headers=headers)
            if r.status_code != 200:
                raise RuntimeError(f"{m.record.stem}: HTTP {r.status_code} {r.text}")
            return dict(r.json())

    return list(await asyncio.gather(*(one(m) for m in frames)))


def _as_detections(body: dict[str, Any]) -> Detections:
    dets = body["detections"]
    return Detections(
        np.asarray([d["box_xyxy"] for d in dets], np.float32).reshape(-1, 4),
        np.asarray([d["score"] for d in dets], np.float32),
        np.asarray([d["class_id"] for d in dets], np.int64),
    )


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    split = load_split(args.data, args.split)
    settings = Settings(bundle=args.bundle, deadline_ms=600_000.0, queue_size=100_000, backend="onnxruntime-cpu")
    app = create_app(settings)
    rows = []
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as client:
            for cols, nrows in _grids(args.grids):
                frames = make_mosaics(split, cols, nrows, args.seed, args.quality, args.format)
                records = [m.record for m in frames]
                for tiling in args.modes.split(","):
                    t0 = time.perf_counter()
                    bodies = await _post_all(client, frames, tiling, args.concurrency)
                    elapsed = time.perf_counter() - t0
                    preds = [_as_detections(b) for b in bodies]
                    recall, matched, dup = served_recall(preds, records)
                    ev = evaluate_detections(preds, DatasetSplit(split.class_names, records, split.root, "mosaic"))
                    ng = sum(b["verdict"] == "NG" for b in bodies)
                    rows.append({
                        "grid": f"{cols}x{nrows}", "frame": f"{records[0].width}x{records[0].height}",
                        "tiling": tiling, "frames": len(frames), "defects": sum(len(r.class_ids) for r in records),
                        "recall50": recall, "map50": float(ev.map50), "matched": matched, "duplicates": dup,
                        "ng_frames": ng, "tiles_per_frame": float(np.mean([b["tiling"]["tiles"] for b in bodies])),
                        "ms_per_frame": 1e3 * elapsed / len(frames),
                    })  # fmt: skip
                    r = rows[-1]
                    line = f"{r['grid']:>6} {r['frame']:>10} tiling={tiling:<4} recall@0.5 {recall:.3f} "
                    line += f"mAP50 {r['map50']:.3f} dup {dup} tiles/frame {r['tiles_per_frame']:.0f}"
                    print(line, file=sys.stderr)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    base = {r["tiling"]: r for r in rows if r["grid"] == "1x1"}
    head = "| frame | tiling | frames | defects | served recall@0.5 | mAP50 | vs 1x1 (recall / mAP50) | duplicates "
    head += "| tiles/frame | ms/frame |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = base.get("auto") or base.get(r["tiling"])
        rel = f"{r['recall50'] / b['recall50']:.2f} / {r['map50'] / b['map50']:.2f}" if b else "-"
        lines.append(
            f"| {r['grid']} ({r['frame']}) | {r['tiling']} | {r['frames']} | {r['defects']} | {r['recall50']:.3f} | "
            f"{r['map50']:.3f} | {rel} | {r['duplicates']} | {r['tiles_per_frame']:.0f} | {r['ms_per_frame']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="NEU-DET folder (VOC layout) or a data.yaml")
    p.add_argument("--bundle", type=Path, default=Path("bundles/default"))
    p.add_argument("--split", default="val")
    p.add_argument("--grids", default="1x1,2x2,4x4,12x10", help="comma-separated COLSxROWS (default 1x1,2x2,4x4,12x10)")
    p.add_argument("--modes", default="auto,off", help="tiling modes to compare (default auto,off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the mosaics (default 95)")
    p.add_argument("--format", choices=("jpg", "png"), default="jpg", help="how the mosaics are encoded (default jpg)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args()
    rows = asyncio.run(run(args))
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
