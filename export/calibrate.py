"""Per-class score thresholds for deployment, chosen on a calibration split.

The GRACE paper lists "deployment-side calibration by setting per-class score thresholds" as future work; this is it.
Detections at the evaluation threshold (``train.predict.EVAL_CONF``, 0.001) are matched to ground truth at IoU >= 0.5,
greedily in descending score order per image and class (the mAP50 rule). Because greedy matching in score order does
not change when low-scoring detections are dropped, cutting the sorted list at any score gives the exact
precision/recall of that threshold.
Two modes: ``f1`` (maximise F1 per class) and ``recall`` (the highest threshold whose recall >= a target: on a line a
missed defect costs more than a false alarm).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from train.evaluate import box_iou
from train.predict import EVAL_CONF

__all__ = [
    "DEFAULT_THRESHOLD",
    "ClassCalibration",
    "calibrate_class",
    "calibrate_thresholds",
    "match_detections",
]

DEFAULT_THRESHOLD = 0.25  # used when there is no calibration data, and for classes the data cannot calibrate
MIN_THRESHOLD = EVAL_CONF  # the evaluation floor: nothing below it was ever scored
MAX_THRESHOLD = 0.999

Mode = Literal["f1", "recall"]


class _Truth(Protocol):
    """Ground truth of one image (``train.dataset.ImageRecord``); read-only, so frozen dataclasses match."""

    @property
    def boxes_xyxy(self) -> npt.NDArray[np.float32]: ...
    @property
    def class_ids(self) -> npt.NDArray[np.int64]: ...


class _Predictions(_Truth, Protocol):
    """Detections of one image (``service.core.postprocess.Detections``)."""

    @property
    def scores(self) -> npt.NDArray[np.float32]: ...


@dataclass(frozen=True)
class ClassCalibration:
    """The chosen operating point of one class on the calibration data."""

    name: str
    threshold: float
    precision: float
    recall: float
    f1: float
    instances: int  # ground-truth boxes of this class
    true_positives: int
    false_positives: int
    note: str = ""  # why the default threshold was used, or that a recall target was unreachable

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "threshold": self.threshold,
            "precision": round(self.precision, 4),
            "recall": round(self.recall, 4),
            "f1": round(self.f1, 4),
            "instances": self.instances,
            "tp": self.true_positives,
            "fp": self.false_positives,
        }
        if self.note:
            d["note"] = self.note
        return d


def match_detections(
    preds: Sequence[_Predictions], truths: Sequence[_Truth], nc: int, *, iou_threshold: float = 0.5
) -> tuple[list[npt.NDArray[np.float64]], list[npt.NDArray[np.bool_]], npt.NDArray[np.int64]]:
    """Label every detection TP/FP against ground truth of the same class.

    Returns:
        scores per class (descending), TP flags per class aligned with those scores, ground-truth count per class (nc,).
    """
    if len(preds) != len(truths):
        raise ValueError(f"{len(preds)} prediction sets for {len(truths)} images")
    scores: list[list[float]] = [[] for _ in range(nc)]
    flags: list[list[bool]] = [[] for _ in range(nc)]
    n_gt = np.zeros(nc, dtype=np.int64)
    for pred, truth in zip(preds, truths, strict=True):
        gt_cls = np.asarray(truth.class_ids, dtype=np.int64)
        n_gt += np.bincount(gt_cls[(gt_cls >= 0) & (gt_cls < nc)], minlength=nc)
        for c in np.unique(np.asarray(pred.class_ids)):
            if not 0 <= c < nc:
                raise ValueError(f"detection class id {c} outside 0..{nc - 1}")
            sel = np.flatnonzero(pred.class_ids == c)
            sel = sel[np.argsort(-pred.scores[sel], kind="stable")]
            gt_boxes = truth.boxes_xyxy[gt_cls == c]
            iou = box_iou(pred.boxes_xyxy[sel], gt_boxes) if len(gt_boxes) else np.zeros((len(sel), 0))
            taken = np.zeros(len(gt_boxes), dtype=bool)
            for row, det in enumerate(sel):
                cand = np.where(taken, -1.0, iou[row]) if len(gt_boxes) else iou[row]
                best = int(np.argmax(cand)) if len(gt_boxes) else -1
                hit = best >= 0 and cand[best] >= iou_threshold
                if hit:
                    taken[best] = True
                scores[c].append(float(pred.scores[det]))
                flags[c].append(bool(hit))
    out_scores, out_flags = [], []
    for c in range(nc):
        s = np.asarray(scores[c], dtype=np.float64)
        f = np.asarray(flags[c], dtype=bool)
        order = np.argsort(-s, kind="stable")
        out_scores.append(s[order])
        out_flags.append(f[order])
    return out_scores, out_flags, n_gt


def _threshold_for(score: float) -> float:
    """A threshold that keeps ``score`` (postprocess keeps score >= threshold) even after a float32 round trip."""
    return float(min(max(round(score - 1e-6, 6), MIN_THRESHOLD), MAX_THRESHOLD))


def calibrate_class(
    name: str, scores: npt.NDArray[np.float64], tp: npt.NDArray[np.bool_], n_gt: int, mode: Mode, target_recall: float
) -> ClassCalibration:
    """The operating point of one class: ``scores`` descending with their true-positive flags ``tp``, ``n_gt``
    ground-truth boxes (the detected ones and the missed ones). Also the rule of ``aoi calibrate-reviews``."""
    if n_gt == 0:
        fp = int(np.sum(scores >= DEFAULT_THRESHOLD))
        return ClassCalibration(name, DEFAULT_THRESHOLD, 0.0, 0.0, 0.0, 0, 0, fp, "no instances in calibration data")
    if len(scores) == 0:
        return ClassCalibration(name, DEFAULT_THRESHOLD, 0.0, 0.0, 0.0, n_gt, 0, 0, "no detections of this class")
    ctp = np.cumsum(tp)
    cfp = np.cumsum(~tp)
    precision = ctp / (ctp + cfp)
    recall = ctp / n_gt
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    # Valid cut points: the last detection of each group of equal scores (a threshold cannot split a tie).
    cuts = np.flatnonzero(np.append(scores[1:] != scores[:-1], True))
    if not tp.any():
        fp = int(np.sum(scores >= DEFAULT_THRESHOLD))
        note = "no true positive at any threshold"
        return ClassCalibration(name, DEFAULT_THRESHOLD, 0.0, 0.0, 0.0, n_gt, 0, fp, note)
    note = ""
    if mode == "f1":
        k = int(cuts[np.argmax(f1[cuts])])  # first maximum = highest threshold among equally good points
    else:
        ok = cuts[recall[cuts] >= target_recall - 1e-12]
        if len(ok):
            k = int(ok[0])
        else:
            k = int(cuts[np.argmax(recall[cuts])])  # the highest threshold that reaches the best recall there is
            note = f"target recall {target_recall:g} not reachable; max recall {recall[k]:.4f} used"
    return ClassCalibration(
        name=name,
        threshold=_threshold_for(float(scores[k])),
        precision=float(precision[k]),
        recall=float(recall[k]),
        f1=float(f1[k]),
        instances=n_gt,
        true_positives=int(ctp[k]),
        false_positives=int(cfp[k]),
        note=note,
    )


def calibrate_thresholds(
    preds: Sequence[_Predictions],
    truths: Sequence[_Truth],
    class_names: Sequence[str],
    *,
    mode: Mode = "f1",
    target_recall: float = 0.9,
    iou_threshold: float = 0.5,
) -> list[ClassCalibration]:
    """Choose one score threshold per class.

    Args:
        preds: detections per image at a low threshold (0.001, like evaluation), original-image pixels.
        truths: ground truth per image (same order), original-image pixels.
        class_names: class id -> name.
        mode: "f1" maximises F1; "recall" takes the highest threshold with recall >= ``target_recall``
            (the lowest threshold, with a note, when the target cannot be reached).
        target_recall: in (0, 1], used by mode "recall".
        iou_threshold: IoU for a detection to count as a true positive.
    """
    if mode not in ("f1", "recall"):
        raise ValueError(f"mode must be 'f1' or 'recall', got {mode!r}")
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target recall must be in (0, 1], got {target_recall}")
    nc = len(class_names)
    scores, flags, n_gt = match_detections(preds, truths, nc, iou_threshold=iou_threshold)
    return [calibrate_class(class_names[c], scores[c], flags[c], int(n_gt[c]), mode, target_recall) for c in range(nc)]
