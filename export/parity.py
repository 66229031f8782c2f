"""Numerical parity between two runtimes of the same detector (torch vs ONNX Runtime vs TensorRT).

Three levels, each with a stated tolerance: raw ``[B, 4+nc, A]`` outputs (max abs diff on boxes in input pixels and on
sigmoid scores), detections after the shared post-processing (same-class matched-box IoU and score delta), and
mAP50 / mAP50-95 on the calibration split when one is given. The result goes into the bundle's ``parity.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from service.core.postprocess import Detections
from train.evaluate import box_iou
from train.predict import EVAL_CONF

__all__ = [
    "COMPARE_CONF",
    "FP16_TOLERANCE",
    "FP32_TOLERANCE",
    "ParityResult",
    "Tolerance",
    "compare_anchors",
    "compare_detections",
    "compare_runs",
    "raw_diff",
]


@dataclass(frozen=True)
class Tolerance:
    """Limits a candidate runtime must meet against the reference; ``None`` = reported, not enforced."""

    box_max_abs: float | None  # input pixels, over every anchor of every image
    score_max_abs: float | None  # sigmoid scores, over every anchor and class
    anchor_iou_min: float | None  # min IoU of reference vs candidate box at the same anchor (NMS candidates)
    match_iou: float  # post-NMS: a reference detection is matched by a same-class candidate box with IoU >= this
    min_match_rate: float | None  # post-NMS matched reference detections / reference detections
    map_delta_max: float | None  # |delta| of mAP50 and of mAP50-95 (only when calibration data is given)
    map50_drop_max: float | None = None  # reference mAP50 - candidate mAP50 (a gain passes); reduced CPU precisions


# fp32 vs fp32: the same arithmetic in a different order (fused BN, other conv kernels); measured ~1e-4 px and
# ~1e-7 on scores. The post-NMS match rate is reported, not enforced: with near-tied scores (untrained weights,
# the 0.001 evaluation threshold) a 1e-7 change legitimately swaps which box survives NMS.
FP32_TOLERANCE = Tolerance(
    box_max_abs=0.05,
    score_max_abs=1e-4,
    anchor_iou_min=0.99,
    match_iou=0.99,
    min_match_rate=None,
    map_delta_max=0.002,
)
# fp16: boxes and scores move by ~1e-3 relative; what must not move is the accuracy, so only mAP is enforced.
FP16_TOLERANCE = Tolerance(
    box_max_abs=None,
    score_max_abs=None,
    anchor_iou_min=None,
    match_iou=0.9,
    min_match_rate=None,
    map_delta_max=0.01,
)

# Detection-level comparison runs at the evaluation setting so that it sees the boxes mAP sees.
COMPARE_CONF = EVAL_CONF


@dataclass(frozen=True)
class ParityResult:
    name: str
    reference: str
    candidate: str
    raw: dict[str, float]
    anchors: dict[str, float | int]
    detections: dict[str, float | int]
    map: dict[str, float] | None
    tolerance: Tolerance
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "candidate": self.candidate,
            "passed": self.passed,
            "failures": list(self.failures),
            "raw": self.raw,
            "anchors": self.anchors,
            "detections": self.detections,
            "map": self.map,
            "tolerance": asdict(self.tolerance),
        }


def raw_diff(ref: npt.NDArray[np.float32], cand: npt.NDArray[np.float32]) -> dict[str, float]:
    """Max / mean absolute difference of ``(N, 4+nc, A)`` outputs, boxes (rows 0-3) and scores separately."""
    if ref.shape != cand.shape:
        raise ValueError(f"output shapes differ: reference {ref.shape}, candidate {cand.shape}")
    d = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
    if not np.isfinite(cand).all():
        return {"box_max_abs": float("inf"), "box_mean_abs": float("inf"), "score_max_abs": float("inf"),
                "score_mean_abs": float("inf")}  # fmt: skip
    return {
        "box_max_abs": float(d[:, :4].max()),
        "box_mean_abs": float(d[:, :4].mean()),
        "score_max_abs": float(d[:, 4:].max()),
        "score_mean_abs": float(d[:, 4:].mean()),
    }


def compare_anchors(
    ref: npt.NDArray[np.float32], cand: npt.NDArray[np.float32], *, conf: float = COMPARE_CONF
) -> dict[str, float | int]:
    """Box IoU and score delta anchor by anchor, over the anchors the reference would pass to NMS (max score > conf).

    Pairing by anchor (not by NMS survivors) is immune to near-tied scores swapping which box survives NMS, which
    happens a lot with untrained weights; the post-NMS comparison is reported separately.
    """
    best = ref[:, 4:].max(axis=1)  # (N, A)
    n, a = np.nonzero(best > conf)
    if len(n) == 0:
        return {"anchors_compared": 0, "iou_min": 1.0, "iou_mean": 1.0, "score_delta_max": 0.0}
    cls = ref[:, 4:].argmax(axis=1)[n, a]

    def _xyxy(out: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        cx, cy, w, h = (out[n, i, a].astype(np.float64) for i in range(4))
        return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)

    rb, cb = _xyxy(ref), _xyxy(cand)
    lt, brc = np.maximum(rb[:, :2], cb[:, :2]), np.minimum(rb[:, 2:], cb[:, 2:])
    inter = np.clip(brc - lt, 0, None).prod(axis=1)
    union = np.clip(rb[:, 2:] - rb[:, :2], 0, None).prod(axis=1) + np.clip(cb[:, 2:] - cb[:, :2], 0, None).prod(axis=1)
    union -= inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 1.0)
    ds = np.abs(ref[n, 4 + cls, a].astype(np.float64) - cand[n, 4 + cls, a])
    return {
        "anchors_compared": len(n),
        "iou_min": float(np.nan_to_num(iou, nan=0.0).min()),
        "iou_mean": float(np.nan_to_num(iou, nan=0.0).mean()),
        "score_delta_max": float(np.nan_to_num(ds, nan=np.inf).max()),
    }


def compare_detections(
    ref: Sequence[Detections], cand: Sequence[Detections], *, match_iou: float
) -> dict[str, float | int]:
    """Match every reference detection to the best same-class candidate box of the same image.

    Returns counts, ``match_rate`` (1.0 when there is nothing to match), min / mean IoU of the best candidates of all
    reference detections, and the max score delta of matched pairs.
    """
    n_ref = n_cand = matched = 0
    ious: list[float] = []
    deltas: list[float] = []
    for r, c in zip(ref, cand, strict=True):
        n_ref += len(r.scores)
        n_cand += len(c.scores)
        if len(r.scores) == 0:
            continue
        iou = box_iou(r.boxes_xyxy, c.boxes_xyxy) if len(c.scores) else np.zeros((len(r.scores), 0))
        iou = np.where(r.class_ids[:, None] == c.class_ids[None, :], iou, 0.0)
        if iou.shape[1] == 0:
            ious.extend([0.0] * len(r.scores))
            continue
        best_iou = iou.max(axis=1)
        ious.extend(best_iou.tolist())
        # Among the boxes that match, pair with the closest score: clipping to the image can make distinct
        # detections share one box, and the pair that really corresponds is the one with the same score.
        dscore = np.abs(r.scores[:, None].astype(np.float64) - c.scores[None, :])
        dscore = np.where(iou >= match_iou, dscore, np.inf)
        ok = np.isfinite(dscore).any(axis=1)
        matched += int(ok.sum())
        if ok.any():
            deltas.extend(dscore[ok].min(axis=1).tolist())
    return {
        "reference_count": n_ref,
        "candidate_count": n_cand,
        "matched": matched,
        "match_rate": matched / n_ref if n_ref else 1.0,
        "iou_min": float(min(ious)) if ious else 1.0,
        "iou_mean": float(np.mean(ious)) if ious else 1.0,
        "score_delta_max": float(max(deltas)) if deltas else 0.0,
    }


def _check(name: str, value: float, limit: float | None, failures: list[str], *, at_least: bool = False) -> None:
    if limit is None:
        return
    bad = not value >= limit if at_least else not value <= limit  # `not` form also catches NaN
    if bad:
        op = ">=" if at_least else "<="
        failures.append(f"{name} = {value:.6g} (tolerance {op} {limit:g})")


def compare_runs(
    name: str,
    *,
    reference: str,
    candidate: str,
    ref_out: npt.NDArray[np.float32],
    cand_out: npt.NDArray[np.float32],
    ref_dets: Sequence[Detections],
    cand_dets: Sequence[Detections],
    tolerance: Tolerance,
    ref_map: dict[str, float] | None = None,
    cand_map: dict[str, float] | None = None,
) -> ParityResult:
    """Compare a candidate runtime with the reference and list every tolerance it breaks.

    Args:
        ref_out, cand_out: raw ``(N, 4+nc, A)`` outputs on the same N images.
        ref_dets, cand_dets: ``service.core.postprocess`` detections of those outputs at :data:`COMPARE_CONF`.
        ref_map, cand_map: ``{"map50", "map50_95"}`` on the calibration split, or None without one.
    """
    raw = raw_diff(ref_out, cand_out)
    anchors = compare_anchors(ref_out, cand_out, conf=COMPARE_CONF)
    dets = compare_detections(ref_dets, cand_dets, match_iou=tolerance.match_iou)
    failures: list[str] = []
    _check("raw box max abs diff (px)", raw["box_max_abs"], tolerance.box_max_abs, failures)
    _check("raw score max abs diff", raw["score_max_abs"], tolerance.score_max_abs, failures)
    _check("same-anchor box IoU min", float(anchors["iou_min"]), tolerance.anchor_iou_min, failures, at_least=True)
    _check("post-NMS match rate", float(dets["match_rate"]), tolerance.min_match_rate, failures, at_least=True)
    map_block = None
    if ref_map is not None and cand_map is not None:
        map_block = {
            "reference_map50": ref_map["map50"],
            "reference_map50_95": ref_map["map50_95"],
            "candidate_map50": cand_map["map50"],
            "candidate_map50_95": cand_map["map50_95"],
            "delta_map50": cand_map["map50"] - ref_map["map50"],
            "delta_map50_95": cand_map["map50_95"] - ref_map["map50_95"],
        }
        _check("|delta mAP50|", abs(map_block["delta_map50"]), tolerance.map_delta_max, failures)
        _check("|delta mAP50-95|", abs(map_block["delta_map50_95"]), tolerance.map_delta_max, failures)
        _check("mAP50 drop", -map_block["delta_map50"], tolerance.map50_drop_max, failures)
    return ParityResult(name, reference, candidate, raw, anchors, dets, map_block, tolerance, failures)
