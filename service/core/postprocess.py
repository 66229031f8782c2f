"""Network output ``[B, 4+nc, A]`` -> per-image detections in original-image pixels, and the OK/NG verdict.

Score filter, class-aware NMS, per-class thresholds, detection cap, undo letterbox, clip. This is the one copy:
train/evaluate and export/parity call it. Two NMS implementations give identical results; OpenCV's
``cv2.dnn.NMSBoxesBatched`` is the default because ``benchmarks/bench_nms.py`` measured it faster than the vectorised
numpy loop at every candidate count (docs/measurements.md, M4).

Merge stage: per-window detections -> one set of detections in frame coordinates.

Tiles overlap, so a defect near a tile border is seen twice (a duplicate) or cut in two (two partial boxes). Two
detections of the same class from different windows are the same defect when their parts inside the region both
windows see agree: IoU > ``match_iou`` after clipping both boxes to that shared region. Matched detections are joined
transitively (a scratch across three tiles is one defect) into the union of their boxes with the best score: the idea
of SAHI's greedy non-maximum merging (NMM), with the match measured where both tiles had the same pixels instead of
by intersection over the smaller box, which under-matches boxes much longer than the overlap. A class-aware NMS and
the detection cap then apply to the merged set. Pure numpy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from service.core.bundle import VerdictRule
from service.core.preprocess import LetterboxInfo, Window

__all__ = ["NMS_IMPLEMENTATIONS", "Detections", "merge_frame", "nms_numpy", "nms_opencv", "postprocess", "verdict"]


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


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


_F = npt.NDArray[np.float64]


def _clipped_iou(a: _F, b: _F, region: _F) -> _F:
    """IoU of every box of ``a`` (n, 4) with every box of ``b`` (m, 4), both first clipped to ``region`` (4,)."""
    lo, hi = region[:2], region[2:]
    ca = np.concatenate([np.maximum(a[:, :2], lo), np.minimum(a[:, 2:], hi)], axis=1)
    cb = np.concatenate([np.maximum(b[:, :2], lo), np.minimum(b[:, 2:], hi)], axis=1)
    area_a = np.clip(ca[:, 2] - ca[:, 0], 0, None) * np.clip(ca[:, 3] - ca[:, 1], 0, None)
    area_b = np.clip(cb[:, 2] - cb[:, 0], 0, None) * np.clip(cb[:, 3] - cb[:, 1], 0, None)
    w = np.clip(np.minimum(ca[:, None, 2], cb[None, :, 2]) - np.maximum(ca[:, None, 0], cb[None, :, 0]), 0, None)
    h = np.clip(np.minimum(ca[:, None, 3], cb[None, :, 3]) - np.maximum(ca[:, None, 1], cb[None, :, 1]), 0, None)
    inter = w * h
    union = area_a[:, None] + area_b[None, :] - inter
    return np.asarray(np.divide(inter, union, out=np.zeros_like(inter), where=union > 0), dtype=np.float64)


def _shared_regions(windows: _F) -> list[tuple[int, int, _F]]:
    """Pairs of windows ``(i, j)``, i < j, that share pixels, with the shared region."""
    lo = np.maximum(windows[:, None, :2], windows[None, :, :2])
    hi = np.minimum(windows[:, None, 2:], windows[None, :, 2:])
    ok = np.all(hi > lo, axis=2)
    ii, jj = np.nonzero(np.triu(ok, k=1))
    return [(int(i), int(j), np.concatenate([lo[i, j], hi[i, j]])) for i, j in zip(ii, jj, strict=True)]


def _cap(dets: Detections, max_detections: int) -> Detections:
    s = dets.scores
    if len(s) <= max_detections and bool(np.all(s[:-1] >= s[1:])):
        return dets  # post-processing's output: already sorted and capped (one window, the common case)
    order = np.argsort(-dets.scores, kind="stable")[:max_detections]
    return Detections(dets.boxes_xyxy[order], dets.scores[order], dets.class_ids[order])


def merge_frame(
    parts: Sequence[Detections],
    windows: Sequence[Window],
    *,
    match_iou: float = 0.5,
    nms_iou: float = 0.7,
    max_detections: int = 300,
) -> Detections:
    """Join the detections of a frame's windows (each already in frame pixels, clipped to its window).

    Args:
        parts: one :class:`Detections` per window, in the order of ``windows``.
        windows: ``(x0, y0, x1, y1)`` frame pixels of each model input (tiles, and the whole frame if it ran).
        match_iou: two same-class detections of overlapping windows are one defect when their boxes, clipped to the
            windows' shared region, have IoU > this.
        nms_iou: class-aware NMS over the merged boxes (as for one image).

    Returns:
        Detections sorted by descending score, at most ``max_detections``.
    """
    if len(parts) != len(windows):
        raise ValueError(f"{len(parts)} detection sets for {len(windows)} windows")
    if len(parts) == 1:
        return _cap(parts[0], max_detections)
    boxes = np.concatenate([p.boxes_xyxy for p in parts]).astype(np.float64)
    scores = np.concatenate([p.scores for p in parts]).astype(np.float32)
    classes = np.concatenate([p.class_ids for p in parts]).astype(np.int64)
    if scores.size == 0:
        return Detections(np.zeros((0, 4), np.float32), scores, classes)
    starts = np.cumsum([0, *(len(p) for p in parts)])
    parent = list(range(scores.size))
    for i, j, region in _shared_regions(np.asarray(windows, np.float64)):
        a, b = slice(starts[i], starts[i + 1]), slice(starts[j], starts[j + 1])
        if a.start == a.stop or b.start == b.stop:
            continue
        iou = _clipped_iou(boxes[a], boxes[b], region)
        iou[classes[a][:, None] != classes[b][None, :]] = 0.0
        for ia, ib in zip(*np.nonzero(iou > match_iou), strict=True):
            ra, rb = _find(parent, a.start + int(ia)), _find(parent, b.start + int(ib))
            if ra != rb:
                parent[rb] = ra
    roots = np.asarray([_find(parent, k) for k in range(scores.size)])
    groups, inverse = np.unique(roots, return_inverse=True)
    merged = np.empty((groups.size, 4), np.float64)
    merged[:, :2] = np.inf
    merged[:, 2:] = -np.inf
    np.minimum.at(merged[:, 0], inverse, boxes[:, 0])
    np.minimum.at(merged[:, 1], inverse, boxes[:, 1])
    np.maximum.at(merged[:, 2], inverse, boxes[:, 2])
    np.maximum.at(merged[:, 3], inverse, boxes[:, 3])
    best = np.full(groups.size, -np.inf, np.float32)
    np.maximum.at(best, inverse, scores)
    cls = classes[groups]  # every member of a group has its root's class
    out_boxes = merged.astype(np.float32)
    keep = nms_opencv(out_boxes, best, cls, nms_iou)
    return _cap(Detections(out_boxes[keep], best[keep], cls[keep]), max_detections)
