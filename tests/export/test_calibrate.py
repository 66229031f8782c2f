"""Per-class threshold calibration on hand-built detections whose F1-optimal / target-recall points are known."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from export.calibrate import DEFAULT_THRESHOLD, calibrate_thresholds, match_detections


@dataclass
class _Dets:
    boxes_xyxy: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray


@dataclass
class _Truth:
    boxes_xyxy: np.ndarray
    class_ids: np.ndarray


def _box(i: int) -> list[float]:
    return [i * 20.0, 0.0, i * 20.0 + 10.0, 10.0]


def _miss(i: int) -> list[float]:
    return [i * 20.0, 50.0, i * 20.0 + 10.0, 60.0]  # far from every ground-truth box


def _scene() -> tuple[list[_Dets], list[_Truth]]:
    """Class 0: 4 GT; detections by score: TP .9, TP .8, FP .7, TP .6, FP .5, FP .4 (one GT never found).
    P/R per cut: (1, .25) (1, .5) (.67, .5) (.75, .75) (.6, .75) (.5, .75) -> F1 max 0.75 at score 0.6.
    Class 1: 2 GT; TP .95, FP .3, TP .2 -> F1: .667, .5, .8 -> best at 0.2 (recall 1)."""
    gt_boxes = [_box(i) for i in range(4)] + [_box(10), _box(11)]
    gt_cls = [0, 0, 0, 0, 1, 1]
    det = [
        (_box(0), 0.9, 0),
        (_box(1), 0.8, 0),
        (_miss(0), 0.7, 0),
        (_box(2), 0.6, 0),
        (_miss(1), 0.5, 0),
        (_miss(2), 0.4, 0),
        (_box(10), 0.95, 1),
        (_miss(3), 0.3, 1),
        (_box(11), 0.2, 1),
    ]
    preds = _Dets(
        np.array([d[0] for d in det], np.float32),
        np.array([d[1] for d in det], np.float32),
        np.array([d[2] for d in det], np.int64),
    )
    truth = _Truth(np.array(gt_boxes, np.float32), np.array(gt_cls, np.int64))
    return [preds], [truth]


def test_f1_mode_picks_known_optimum() -> None:
    preds, truths = _scene()
    cal = calibrate_thresholds(preds, truths, ["scratch", "dent"], mode="f1")
    c0, c1 = cal
    assert c0.threshold == pytest.approx(0.6, abs=1e-5) and c0.threshold <= 0.6
    assert (c0.precision, c0.recall, c0.true_positives, c0.false_positives) == (0.75, 0.75, 3, 1)
    assert c0.f1 == pytest.approx(0.75)
    assert c1.threshold == pytest.approx(0.2, abs=1e-5) and c1.recall == 1.0
    assert c1.precision == pytest.approx(2 / 3)
    assert c0.instances == 4 and c1.instances == 2


def test_threshold_keeps_the_chosen_detection_in_float32() -> None:
    preds, truths = _scene()
    c0 = calibrate_thresholds(preds, truths, ["a", "b"])[0]
    assert np.float32(0.6) >= np.float32(c0.threshold)
    assert c0.threshold > 0.5  # the next detection (an FP at 0.5) is dropped


def test_recall_mode_takes_highest_threshold_meeting_target() -> None:
    preds, truths = _scene()
    c0, c1 = calibrate_thresholds(preds, truths, ["a", "b"], mode="recall", target_recall=0.5)
    assert c0.threshold == pytest.approx(0.8, abs=1e-5) and c0.recall == 0.5
    assert c1.threshold == pytest.approx(0.95, abs=1e-5) and c1.recall == 0.5


def test_unreachable_recall_uses_best_recall_with_note() -> None:
    preds, truths = _scene()
    c0 = calibrate_thresholds(preds, truths, ["a", "b"], mode="recall", target_recall=1.0)[0]
    assert c0.recall == 0.75 and c0.threshold == pytest.approx(0.6, abs=1e-5)
    assert "not reachable" in c0.note


def test_classes_without_data_get_default_with_note() -> None:
    preds, truths = _scene()
    cal = calibrate_thresholds(preds, truths, ["a", "b", "unseen"])
    assert cal[2].threshold == DEFAULT_THRESHOLD and "no instances" in cal[2].note
    empty = [_Dets(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))]
    cal = calibrate_thresholds(empty, truths, ["a", "b"])
    assert cal[0].threshold == DEFAULT_THRESHOLD and cal[0].note == "no detections of this class"


def test_ties_are_not_split() -> None:
    boxes = np.array([_box(0), _miss(0)], np.float32)
    preds = [_Dets(boxes, np.array([0.5, 0.5], np.float32), np.array([0, 0], np.int64))]
    truths = [_Truth(np.array([_box(0)], np.float32), np.array([0], np.int64))]
    c0 = calibrate_thresholds(preds, truths, ["a"])[0]
    assert (c0.true_positives, c0.false_positives) == (1, 1)


def test_each_ground_truth_matches_once() -> None:
    boxes = np.array([_box(0), _box(0)], np.float32)
    preds = [_Dets(boxes, np.array([0.9, 0.8], np.float32), np.array([0, 0], np.int64))]
    truths = [_Truth(np.array([_box(0)], np.float32), np.array([0], np.int64))]
    _, flags, n_gt = match_detections(preds, truths, 1)
    assert flags[0].tolist() == [True, False] and n_gt.tolist() == [1]


def test_bad_arguments_are_rejected() -> None:
    preds, truths = _scene()
    with pytest.raises(ValueError, match="mode"):
        calibrate_thresholds(preds, truths, ["a", "b"], mode="precision")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="target recall"):
        calibrate_thresholds(preds, truths, ["a", "b"], mode="recall", target_recall=1.5)
    with pytest.raises(ValueError, match="class id"):
        calibrate_thresholds(preds, truths, ["a"])
