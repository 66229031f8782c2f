"""Network output ``[B, 4+nc, A]`` -> per-image detections in original-image pixels, and the OK/NG verdict.

Score filter, class-aware NMS, per-class thresholds, detection cap, undo letterbox, clip. This is the one copy:
train/evaluate and export/parity call it. Two NMS implementations give identical results; OpenCV's
``cv2.dnn.NMSBoxesBatched`` is the default because ``benchmarks/bench_nms.py`` measured it faster than the vectorised
numpy loop at every candidate count (docs/measurements.md, M4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from service.core.bundle import VerdictRule
from service.core.preprocess import LetterboxInfo

__all__ = [
    "NMS_IMPLEMENTATIONS",
    "Detections",
    "nms_numpy",
    "nms_opencv",
    "postprocess",
    "verdict",
]

NmsFn = Callable[
    [npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.int64], float], npt.NDArray[np.int64]
]


@dataclass(frozen=True)
class Detections:
    """Detections of one image, sorted by descending score."""

    boxes_xyxy: npt.NDArray[np.float32]  # (N, 4) original-image pixels, clipped to the letterboxed region
    scores: npt.NDArray[np.float32]  # (N,)
    class_ids: npt.NDArray[np.int64]  # (N,)

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def _empty() -> Detections:
    return Detections(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int64))


def nms_numpy(
    boxes_xyxy: npt.NDArray[np.float32], scores: npt.NDArray[np.float32], class_ids: npt.NDArray[np.int64], iou: float
) -> npt.NDArray[np.int64]:
    """Greedy class-aware NMS: indices kept, by descending score. A box is suppressed by a higher-scoring box of the
    same class whose IoU with it is > ``iou``.

    Classes are separated by shifting each class's boxes by ``class_id * (max coordinate + 1)``, so one pass over all
    boxes never compares two classes (the batched-NMS offset trick).
    """
    if scores.shape[0] == 0:
        return np.zeros((0,), np.int64)
    offset = class_ids.astype(np.float64)[:, None] * (float(np.abs(boxes_xyxy).max()) + 1.0)
    b = boxes_xyxy.astype(np.float64) + offset
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        union = areas[i] + areas[rest] - inter
        overlap = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[overlap <= iou]
    return np.asarray(keep, dtype=np.int64)


def nms_opencv(
    boxes_xyxy: npt.NDArray[np.float32], scores: npt.NDArray[np.float32], class_ids: npt.NDArray[np.int64], iou: float
) -> npt.NDArray[np.int64]:
    """Same contract as :func:`nms_numpy`, via ``cv2.dnn.NMSBoxesBatched`` (boxes as x, y, w, h)."""
    if scores.shape[0] == 0:
        return np.zeros((0,), np.int64)
    xywh = boxes_xyxy.astype(np.float64).copy()
    xywh[:, 2:] -= xywh[:, :2]
    idx = cv2.dnn.NMSBoxesBatched(xywh.tolist(), scores.tolist(), class_ids.tolist(), 0.0, float(iou))
    keep = np.asarray(idx, dtype=np.int64).reshape(-1)
    return keep[np.argsort(-scores[keep], kind="stable")]


NMS_IMPLEMENTATIONS: dict[str, NmsFn] = {"numpy": nms_numpy, "opencv": nms_opencv}


def _one_image(
    pred: npt.NDArray[np.float32],
    info: LetterboxInfo,
    thr: npt.NDArray[np.float32],
    nms_iou: float,
    max_detections: int,
    max_candidates: int,
    nms: NmsFn,
) -> Detections:
    scores_all = pred[4:]  # (nc, A)
    cls = scores_all.argmax(axis=0)
    best = scores_all[cls, np.arange(scores_all.shape[1])]
    cand = np.flatnonzero(best > thr.min())
    if cand.size > max_candidates:
        cand = cand[np.argpartition(-best[cand], max_candidates - 1)[:max_candidates]]
    cand = cand[best[cand] >= thr[cls[cand]]]
    if cand.size == 0:
        return _empty()
    cxcywh = pred[:4, cand].T.astype(np.float32)  # (n, 4) letterboxed pixels
    boxes = np.empty_like(cxcywh)
    boxes[:, :2] = cxcywh[:, :2] - cxcywh[:, 2:] / 2
    boxes[:, 2:] = cxcywh[:, :2] + cxcywh[:, 2:] / 2
    scores = best[cand].astype(np.float32)
    class_ids = cls[cand].astype(np.int64)
    keep = nms(boxes, scores, class_ids, nms_iou)[:max_detections]
    boxes, scores, class_ids = boxes[keep], scores[keep], class_ids[keep]
    boxes[:, [0, 2]] = ((boxes[:, [0, 2]] - info.pad_x) / info.scale).clip(0, info.src_width) + info.offset_x
    boxes[:, [1, 3]] = ((boxes[:, [1, 3]] - info.pad_y) / info.scale).clip(0, info.src_height) + info.offset_y
    return Detections(boxes.astype(np.float32), scores, class_ids)


def postprocess(
    output: npt.NDArray[np.float32],
    infos: Sequence[LetterboxInfo],
    thresholds: Sequence[float] | npt.NDArray[np.floating],
    *,
    nms_iou: float = 0.7,
    max_detections: int = 300,
    max_candidates: int = 30000,
    nms: str = "opencv",
) -> list[Detections]:
    """Decode a batch of raw outputs into detections per image.

    Args:
        output: ``(B, 4+nc, A)`` float: cx, cy, w, h in letterboxed-input pixels, then per-class sigmoid scores.
        infos: one :class:`LetterboxInfo` per image, to map boxes back to original pixels.
        thresholds: ``(nc,)`` score threshold per class id. Candidates are anchors whose best class score is
            ``> min(thresholds)``; each keeps only its argmax class (one label per box) and survives when that score
            is ``>= thresholds[class]``.
        nms_iou: class-aware NMS suppresses same-class boxes with IoU ``> nms_iou``.
        max_detections: cap per image, highest scores first.
        max_candidates: cap on candidates entering NMS, highest scores first.
        nms: ``"opencv"`` (default, faster) or ``"numpy"``; same results (see :data:`NMS_IMPLEMENTATIONS`).
    """
    if output.ndim != 3:
        raise ValueError(f"output must be (B, 4+nc, A), got shape {output.shape}")
    thr = np.asarray(thresholds, dtype=np.float32).reshape(-1)
    if output.shape[1] != 4 + thr.shape[0]:
        raise ValueError(f"output has {output.shape[1]} rows, expected 4 + {thr.shape[0]} classes")
    if output.shape[0] != len(infos):
        raise ValueError(f"output batch {output.shape[0]} != {len(infos)} letterbox infos")
    fn = NMS_IMPLEMENTATIONS[nms]
    out = np.asarray(output, dtype=np.float32)
    return [_one_image(out[b], infos[b], thr, nms_iou, max_detections, max_candidates, fn) for b in range(out.shape[0])]


def verdict(dets: Detections, rule: VerdictRule, class_names: Sequence[str]) -> str:
    """``"NG"`` when a detection of a rejecting class (``rule.reject_classes``, None = all) has a box area in
    original pixels >= ``rule.min_box_area``; otherwise ``"OK"``."""
    if len(dets) == 0:
        return "OK"
    areas = (dets.boxes_xyxy[:, 2] - dets.boxes_xyxy[:, 0]) * (dets.boxes_xyxy[:, 3] - dets.boxes_xyxy[:, 1])
    mask = areas >= rule.min_box_area
    if rule.reject_classes is not None:
        rejecting = [i for i, name in enumerate(class_names) if name in set(rule.reject_classes)]
        mask &= np.isin(dets.class_ids, rejecting)
    return "NG" if bool(mask.any()) else "OK"
