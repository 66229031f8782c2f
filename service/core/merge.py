"""Merge stage: per-window detections -> one set of detections in frame coordinates.

Tiles overlap, so a defect near a tile border is seen twice (a duplicate) or cut in two (two partial boxes). Two
detections of the same class from different windows are the same defect when their parts inside the region both
windows see agree: IoU > ``match_iou`` after clipping both boxes to that shared region. Matched detections are joined
transitively (a scratch across three tiles is one defect) into the union of their boxes with the best score: the idea
of SAHI's greedy non-maximum merging (NMM), with the match measured where both tiles had the same pixels instead of
by intersection over the smaller box, which under-matches boxes much longer than the overlap. A class-aware NMS and
the detection cap then apply to the merged set. Pure numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from service.core.postprocess import Detections, nms_opencv
from service.core.preprocess import Window

__all__ = ["merge_frame"]


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
