"""COCO-protocol detection evaluation in numpy, shared by the trainer and ``aoi val``.

Reproduces ``pycocotools.cocoeval.COCOeval`` for boxes (greedy matching per IoU threshold 0.50:0.05:0.95, gt
area ranges with inclusive bounds, 101-point interpolated AP, maxDets 100 per image and class) without depending
on it; ``tests/train/test_evaluate.py`` pins the numbers to pycocotools. Precision, recall and F1 follow YOLO val:
per-class curves over confidence, read at the confidence that maximises the class-mean F1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from service.core.postprocess import Detections
from train.dataset import DatasetSplit

if TYPE_CHECKING:
    import torch

__all__ = [
    "AREA_RANGES",
    "IOU_THRESHOLDS",
    "MAX_DETS",
    "RECALL_THRESHOLDS",
    "EvalResult",
    "box_iou",
    "evaluate_detections",
    "evaluate_model",
]

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCO: .50:.05:.95
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # COCO 101-point interpolation
MAX_DETS = 100  # per image and class, as COCOeval's default AP; our postprocess keeps up to 300 per image
# COCOeval areaRng: both bounds inclusive, so a box of exactly 96^2 counts as medium AND large (one NEU-DET val box).
AREA_RANGES: dict[str, tuple[float, float]] = {
    "all": (0.0, 1e10),
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, 1e10),
}
CONF_GRID = np.linspace(0.0, 1.0, 1000)  # confidence axis of the P/R/F1 curves
CONFUSION_CONF, CONFUSION_IOU = 0.25, 0.45  # YOLO val's confusion-matrix settings
_F = npt.NDArray[np.float64]


@dataclass
class EvalResult:
    """Metrics of one split (fractions 0-1; None where the split has no ground truth to measure against).

    ``ap`` is ``(nc, 10)``: AP per class and IoU threshold (NaN for classes without instances). ``pr_precision``
    ``(nc, 101)`` is the interpolated precision at IoU 0.5 over ``RECALL_THRESHOLDS``; ``p_curve``/``r_curve``/
    ``f1_curve`` ``(nc, 1000)`` are over ``CONF_GRID``; ``confusion`` ``(nc+1, nc+1)`` counts [predicted, true] with
    the last row/column for background.
    """

    class_names: list[str]
    map50: float
    map50_95: float
    precision: float
    recall: float
    f1: float
    conf_at_best_f1: float
    ap_small: float | None
    ap_medium: float | None
    ap_large: float | None
    per_class: dict[str, dict[str, Any]]
    num_images: int
    num_instances: int
    area_instances: dict[str, int]  # small < 32^2 <= medium <= 96^2 < large (disjoint counts, for reports)
    ap: _F = field(repr=False)
    pr_precision: _F = field(repr=False)
    p_curve: _F = field(repr=False)
    r_curve: _F = field(repr=False)
    f1_curve: _F = field(repr=False)
    confusion: npt.NDArray[np.int64] = field(repr=False)

    @property
    def fitness(self) -> float:
        """Best-checkpoint criterion: 0.1 mAP50 + 0.9 mAP50-95 (YOLO)."""
        return 0.1 * self.map50 + 0.9 * self.map50_95

    def to_json(self) -> dict[str, Any]:
        """The ``aoi val --json`` document (fractions rounded to 6 decimals; null where nothing could be measured)."""
        doc: dict[str, Any] = {k: _round(getattr(self, k)) for k in _JSON_KEYS}
        doc["per_class"] = {
            n: {"ap50": _round(v["ap50"]), "ap50_95": _round(v["ap50_95"])} for n, v in self.per_class.items()
        }
        return doc


_JSON_KEYS = ("map50", "map50_95", "precision", "recall", "f1", "ap_small", "ap_medium", "ap_large")


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


def box_iou(a: npt.NDArray[np.floating], b: npt.NDArray[np.floating]) -> _F:
    """IoU matrix ``(len(a), len(b))`` of xyxy pixel boxes, in float64 (continuous coordinates: area = w * h, as
    COCO). A negative width or height counts as 0, so a degenerate box has IoU 0 with everything.

    The one numpy box IoU of evaluation, calibration and export parity (``service`` keeps its own inside NMS and
    tile merging, as it cannot import ``train``).
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = iw.clip(0) * ih.clip(0)
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.asarray(np.divide(inter, union, out=np.zeros_like(inter), where=union > 0), dtype=np.float64)


def _best_gt(row: _F, taken: npt.NDArray[np.bool_], candidates: npt.NDArray[np.int64], thr: float) -> int:
    best, match = thr, -1
    for g in candidates:
        if not taken[g] and row[g] >= best:  # ">=": on ties the later gt wins, as in COCOeval
            best, match = row[g], int(g)
    return match


def _match(ious: _F, gt_ignore: npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
    """COCOeval greedy matching. ``ious`` is ``(D, G)`` with detections in descending score order.

    Returns ``(T, D)`` matched gt index or -1. A detection takes the unmatched non-ignored gt with the highest IoU
    >= threshold, and only when there is none an ignored gt (out of the area range).
    """
    n_det, n_gt = ious.shape
    matched = np.full((len(IOU_THRESHOLDS), n_det), -1, dtype=np.int64)
    if n_det == 0 or n_gt == 0:
        return matched
    taken = np.zeros((len(IOU_THRESHOLDS), n_gt), dtype=bool)
    normal, ignored = np.flatnonzero(~gt_ignore), np.flatnonzero(gt_ignore)
    thresholds = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)
    for d in np.flatnonzero(ious.max(axis=1) >= thresholds[0]):  # the rest can match nothing: skip them
        for t, thr in enumerate(thresholds):
            g = _best_gt(ious[d], taken[t], normal, thr)
            if g < 0:
                g = _best_gt(ious[d], taken[t], ignored, thr)
            if g >= 0:
                taken[t, g] = True
                matched[t, d] = g
    return matched


@dataclass
class _Accumulator:
    """Per (class, area range): detection scores, true-positive and ignore flags ``(T, D)``, and the gt count."""

    scores: list[_F] = field(default_factory=list)
    tp: list[npt.NDArray[np.bool_]] = field(default_factory=list)
    ignore: list[npt.NDArray[np.bool_]] = field(default_factory=list)
    n_gt: int = 0

    def add_image(self, scores: _F, det_area: _F, gt_area: _F, ious: _F, lo: float, hi: float) -> None:
        gt_ignore = (gt_area < lo) | (gt_area > hi)
        matched = _match(ious, gt_ignore)
        is_tp = matched >= 0
        det_out = (det_area < lo) | (det_area > hi)
        ignore = np.where(is_tp, gt_ignore[matched.clip(0)] if len(gt_area) else False, det_out[None, :])
        self.scores.append(scores)
        self.tp.append(is_tp & ~ignore)
        self.ignore.append(ignore)
        self.n_gt += int((~gt_ignore).sum())

    def curves(self) -> tuple[_F, _F, _F]:
        """Sorted scores ``(D,)`` with cumulative precision and recall ``(T, D)`` (ignored detections removed)."""
        scores = np.concatenate(self.scores) if self.scores else np.zeros(0)
        order = np.argsort(-scores, kind="mergesort")
        nt = len(IOU_THRESHOLDS)
        tp = np.concatenate(self.tp, axis=1)[:, order] if self.tp else np.zeros((nt, 0), bool)
        ignore = np.concatenate(self.ignore, axis=1)[:, order] if self.ignore else np.zeros((nt, 0), bool)
        tp_sum = np.cumsum(tp, axis=1, dtype=np.float64)
        fp_sum = np.cumsum(~tp & ~ignore, axis=1, dtype=np.float64)
        recall = tp_sum / max(self.n_gt, 1)
        precision = tp_sum / (tp_sum + fp_sum + np.spacing(1))
        return scores[order], precision, recall

    def average_precision(self) -> tuple[_F, _F] | None:
        """AP per IoU threshold ``(T,)`` and interpolated precision ``(T, 101)``; None without ground truth."""
        if self.n_gt == 0:
            return None
        _, precision, recall = self.curves()
        interp = np.zeros((len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)))
        for t in range(len(IOU_THRESHOLDS)):
            envelope = np.maximum.accumulate(precision[t][::-1])[::-1]
            idx = np.searchsorted(recall[t], RECALL_THRESHOLDS, side="left")
            ok = idx < len(envelope)
            interp[t, ok] = envelope[idx[ok]]
        return interp.mean(axis=1), interp


def _per_image_class(det: Detections, boxes: _F, classes: npt.NDArray[np.int64], c: int) -> tuple[_F, ...]:
    keep = np.flatnonzero(det.class_ids == c)
    keep = keep[np.argsort(-det.scores[keep], kind="mergesort")][:MAX_DETS]
    d_boxes = det.boxes_xyxy[keep].astype(np.float64)
    g_boxes = boxes[classes == c]
    d_area = (d_boxes[:, 2] - d_boxes[:, 0]) * (d_boxes[:, 3] - d_boxes[:, 1])
    g_area = (g_boxes[:, 2] - g_boxes[:, 0]) * (g_boxes[:, 3] - g_boxes[:, 1])
    return det.scores[keep].astype(np.float64), d_area, g_area, box_iou(d_boxes, g_boxes)


def _smooth(y: _F, fraction: float = 0.1) -> _F:
    """Centred moving average over ``fraction`` of the points, edges padded (YOLO smooths the mean F1 curve so)."""
    nf = round(len(y) * fraction) // 2 * 2 + 1
    padded = np.concatenate([np.full(nf // 2, y[0]), y, np.full(nf // 2, y[-1])])
    return np.convolve(padded, np.ones(nf) / nf, mode="valid")


def _confidence_curves(acc: list[_Accumulator]) -> tuple[_F, _F, _F]:
    """Per-class precision, recall and F1 at IoU 0.5 over ``CONF_GRID``, ``(nc, 1000)`` each."""
    p_curve = np.zeros((len(acc), len(CONF_GRID)))
    r_curve = np.zeros_like(p_curve)
    for c, a in enumerate(acc):
        scores, precision, recall = a.curves()
        if a.n_gt == 0 or len(scores) == 0:
            continue
        r_curve[c] = np.interp(-CONF_GRID, -scores, recall[0], left=0)
        p_curve[c] = np.interp(-CONF_GRID, -scores, precision[0], left=1)
    f1_curve = 2 * p_curve * r_curve / (p_curve + r_curve + 1e-16)
    return p_curve, r_curve, f1_curve


def _confusion(preds: Sequence[Detections], split: DatasetSplit) -> npt.NDArray[np.int64]:
    nc = len(split.class_names)
    matrix = np.zeros((nc + 1, nc + 1), dtype=np.int64)
    for det, record in zip(preds, split.records, strict=True):
        keep = det.scores >= CONFUSION_CONF
        d_cls, gt_cls = det.class_ids[keep], record.class_ids
        ious = box_iou(record.boxes_xyxy, det.boxes_xyxy[keep])
        gi, di = np.nonzero(ious > CONFUSION_IOU)
        order = np.argsort(-ious[gi, di], kind="mergesort")
        used_g, used_d = set(), set()
        for g, d in zip(gi[order].tolist(), di[order].tolist(), strict=True):  # best-IoU pairs first, one-to-one
            if g not in used_g and d not in used_d:
                used_g.add(g)
                used_d.add(d)
                matrix[d_cls[d], gt_cls[g]] += 1
        for g in set(range(len(gt_cls))) - used_g:
            matrix[nc, gt_cls[g]] += 1
        for d in set(range(len(d_cls))) - used_d:
            matrix[d_cls[d], nc] += 1
    return matrix


def _area_counts(split: DatasetSplit) -> dict[str, int]:
    boxes = np.concatenate([r.boxes_xyxy for r in split.records]).astype(np.float64).reshape(-1, 4)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return {
        "small": int((area < 32**2).sum()),
        "medium": int(((area >= 32**2) & (area <= 96**2)).sum()),
        "large": int((area > 96**2).sum()),
    }


def _mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def evaluate_detections(preds: Sequence[Detections], split: DatasetSplit) -> EvalResult:
    """Score detections (one :class:`Detections` per record of ``split``, original-image pixels) by the COCO protocol.

    Ground truth: every box of the split, ``difficult`` ones included (VOC ``difficult`` is not an ignore flag here).
    """
    if len(preds) != len(split.records):
        raise ValueError(f"{len(preds)} detection sets for {len(split.records)} images in split '{split.split}'")
    nc = len(split.class_names)
    acc = {a: [_Accumulator() for _ in range(nc)] for a in AREA_RANGES}
    for det, record in zip(preds, split.records, strict=True):
        gt_boxes = record.boxes_xyxy.astype(np.float64)
        if len(det) and (det.class_ids.min() < 0 or det.class_ids.max() >= nc):
            raise ValueError(f"{record.stem}: detection class id outside 0..{nc - 1}")
        for c in np.union1d(det.class_ids, record.class_ids).tolist():
            scores, d_area, g_area, ious = _per_image_class(det, gt_boxes, record.class_ids, int(c))
            for name, (lo, hi) in AREA_RANGES.items():
                acc[name][c].add_image(scores, d_area, g_area, ious, lo, hi)
    results = {name: [a.average_precision() for a in accs] for name, accs in acc.items()}
    ap = np.full((nc, len(IOU_THRESHOLDS)), np.nan)
    pr_precision = np.zeros((nc, len(RECALL_THRESHOLDS)))
    for c, res in enumerate(results["all"]):
        if res is not None:
            ap[c], pr_precision[c] = res[0], res[1][0]
    valid = ~np.isnan(ap[:, 0])
    area_ap = {n: _mean_or_none([float(r[0].mean()) for r in results[n] if r is not None]) for n in AREA_RANGES}

    p_curve, r_curve, f1_curve = _confidence_curves(acc["all"])
    best = int(np.argmax(_smooth(f1_curve[valid].mean(axis=0)))) if valid.any() else 0
    counts = split.class_counts()
    images_with = np.zeros(nc, dtype=np.int64)
    for record in split.records:
        images_with[np.unique(record.class_ids)] += 1
    per_class: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(split.class_names):
        per_class[name] = {
            "ap50": float(ap[c, 0]) if valid[c] else None,
            "ap50_95": float(ap[c].mean()) if valid[c] else None,
            "precision": float(p_curve[c, best]),
            "recall": float(r_curve[c, best]),
            "instances": int(counts[c]),
            "images": int(images_with[c]),
        }
    return EvalResult(
        class_names=list(split.class_names),
        map50=float(ap[valid, 0].mean()) if valid.any() else 0.0,
        map50_95=float(ap[valid].mean()) if valid.any() else 0.0,
        precision=float(p_curve[valid, best].mean()) if valid.any() else 0.0,
        recall=float(r_curve[valid, best].mean()) if valid.any() else 0.0,
        f1=float(f1_curve[valid, best].mean()) if valid.any() else 0.0,
        conf_at_best_f1=float(CONF_GRID[best]),
        ap_small=area_ap["small"],
        ap_medium=area_ap["medium"],
        ap_large=area_ap["large"],
        per_class=per_class,
        num_images=len(split.records),
        num_instances=split.num_instances,
        area_instances=_area_counts(split),
        ap=ap,
        pr_precision=pr_precision,
        p_curve=p_curve,
        r_curve=r_curve,
        f1_curve=f1_curve,
        confusion=_confusion(preds, split),
    )


def evaluate_model(
    model: torch.nn.Module,
    split: DatasetSplit,
    *,
    imgsz: int,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> tuple[EvalResult, list[Detections]]:
    """Evaluate a torch detector on ``split``: service letterbox to ``imgsz``, conf 0.001, NMS IoU 0.7, 300 dets.

    The model is put in eval mode for the run (its previous train/eval mode is restored) and moved to ``device``.
    """
    from train.predict import predict_split, torch_infer

    was_training = model.training
    model.eval().to(device)
    try:
        preds = predict_split(torch_infer(model, device), split, input_hw=(imgsz, imgsz), batch_size=batch_size)
    finally:
        model.train(was_training)
    return evaluate_detections(preds, split), preds
