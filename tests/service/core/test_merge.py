"""The merge in service/core/postprocess.py: per-tile detections (cut boxes, duplicates, chains) into one set."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.bundle import VerdictRule
from service.core.frames import TilingPolicy, plan_frame
from service.core.postprocess import Detections, merge_frame, verdict
from service.core.preprocess import Window

Row = tuple[float, float, float, float, float, int]  # x1, y1, x2, y2 (frame px), score, class id

LEFT: Window = (0, 0, 100, 100)
RIGHT: Window = (50, 0, 150, 100)  # shares x 50..100 with LEFT
GRID: list[Window] = [(0, 0, 100, 100), (50, 0, 150, 100), (0, 50, 100, 150), (50, 50, 150, 150)]


def _dets(*rows: Row) -> Detections:
    if not rows:
        return Detections(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int64))
    arr = np.asarray(rows, np.float64)
    return Detections(arr[:, :4].astype(np.float32), arr[:, 4].astype(np.float32), arr[:, 5].astype(np.int64))


def _clip(box: tuple[float, float, float, float], w: Window) -> tuple[float, float, float, float]:
    return max(box[0], w[0]), max(box[1], w[1]), min(box[2], w[2]), min(box[3], w[3])


def _rows(d: Detections) -> list[tuple[list[float], float, int]]:
    # float32 scores rounded to 6 decimals compare equal to the float literals they were made from
    rows = zip(d.boxes_xyxy.tolist(), d.scores.tolist(), d.class_ids.tolist(), strict=True)
    return [(box, round(score, 6), cls) for box, score, cls in rows]


def _check_dtypes(d: Detections) -> None:
    assert d.boxes_xyxy.dtype == np.float32 and d.scores.dtype == np.float32 and d.class_ids.dtype == np.int64
    assert d.boxes_xyxy.shape == (len(d), 4)


def test_box_cut_by_a_vertical_border_is_one_box() -> None:
    true = (30.0, 20.0, 120.0, 60.0)
    parts = [_dets((*_clip(true, LEFT), 0.6, 0)), _dets((*_clip(true, RIGHT), 0.8, 0))]
    out = merge_frame(parts, [LEFT, RIGHT])
    _check_dtypes(out)
    assert _rows(out) == [([30.0, 20.0, 120.0, 60.0], 0.8, 0)]


def test_box_across_four_tiles_is_one_box() -> None:
    true = (30.0, 40.0, 120.0, 110.0)
    scores = (0.5, 0.7, 0.9, 0.6)
    parts = [_dets((*_clip(true, w), s, 1)) for w, s in zip(GRID, scores, strict=True)]
    out = merge_frame(parts, GRID)
    assert _rows(out) == [([30.0, 40.0, 120.0, 110.0], 0.9, 1)]


def test_duplicate_in_the_overlap_comes_back_once() -> None:
    box = (60.0, 10.0, 90.0, 40.0)  # inside x 50..100, seen whole by both tiles
    out = merge_frame([_dets((*box, 0.7, 0)), _dets((61.0, 11.0, 90.0, 41.0, 0.75, 0))], [LEFT, RIGHT])
    assert len(out) == 1
    assert out.boxes_xyxy[0].tolist() == [60.0, 10.0, 90.0, 41.0] and out.scores[0] == pytest.approx(0.75)


def test_separate_defects_of_one_class_stay_two() -> None:
    left, right = (10.0, 10.0, 40.0, 40.0), (110.0, 60.0, 140.0, 90.0)
    out = merge_frame([_dets((*left, 0.9, 0)), _dets((*right, 0.8, 0))], [LEFT, RIGHT])
    assert _rows(out) == [(list(left), 0.9, 0), (list(right), 0.8, 0)]


def test_neighbours_in_the_overlap_that_barely_touch_stay_two() -> None:
    # both inside the shared region, same class, IoU 100 / 1450 there: two defects, not one
    a, b = (55.0, 10.0, 80.0, 40.0), (75.0, 20.0, 95.0, 60.0)
    out = merge_frame([_dets((*a, 0.9, 0)), _dets((*b, 0.8, 0))], [LEFT, RIGHT], match_iou=0.5)
    assert len(out) == 2


def test_same_place_other_class_is_not_merged() -> None:
    true = (30.0, 20.0, 120.0, 60.0)
    parts = [_dets((*_clip(true, LEFT), 0.6, 0)), _dets((*_clip(true, RIGHT), 0.8, 1))]
    out = merge_frame(parts, [LEFT, RIGHT])
    assert _rows(out) == [
        ([50.0, 20.0, 120.0, 60.0], 0.8, 1),
        ([30.0, 20.0, 100.0, 60.0], 0.6, 0),
    ]


def test_long_object_across_three_tiles_is_joined_transitively() -> None:
    windows: list[Window] = [(0, 0, 100, 100), (80, 0, 180, 100), (160, 0, 260, 100)]  # tiles 1 and 3 do not meet
    true = (20.0, 45.0, 240.0, 55.0)
    parts = [_dets((*_clip(true, w), 0.5 + 0.1 * k, 0)) for k, w in enumerate(windows)]
    out = merge_frame(parts, windows)
    assert _rows(out) == [([20.0, 45.0, 240.0, 55.0], 0.7, 0)]


def test_single_window_passes_through_sorted_and_capped() -> None:
    part = _dets((0.0, 0.0, 10.0, 10.0, 0.2, 0), (0.0, 0.0, 10.0, 10.0, 0.9, 0), (5.0, 5.0, 20.0, 20.0, 0.5, 1))
    out = merge_frame([part], [(0, 0, 64, 64)], max_detections=2)
    # no NMS on a single window (its detections already went through NMS): the identical boxes both stay
    assert _rows(out) == [([0.0, 0.0, 10.0, 10.0], 0.9, 0), ([5.0, 5.0, 20.0, 20.0], 0.5, 1)]
    assert len(merge_frame([part], [(0, 0, 64, 64)])) == 3


def test_max_detections_caps_the_merged_set() -> None:
    left = _dets(*((10.0 * k, 0.0, 10.0 * k + 5, 5.0, 0.1 * k, 0) for k in range(1, 5)))  # x < 50: left only
    right = _dets(*((100.0 + 10 * k, 50.0, 105.0 + 10 * k, 55.0, 0.1 * k + 0.05, 0) for k in range(1, 5)))
    out = merge_frame([left, right], [LEFT, RIGHT], max_detections=3)
    assert out.scores.tolist() == pytest.approx([0.45, 0.4, 0.35])
    assert len(merge_frame([left, right], [LEFT, RIGHT])) == 8


@pytest.mark.parametrize("which", ["all", "first", "second"])
def test_empty_parts(which: str) -> None:
    box = _dets((60.0, 10.0, 70.0, 20.0, 0.9, 1))
    parts = {"all": [_dets(), _dets()], "first": [_dets(), box], "second": [box, _dets()]}[which]
    out = merge_frame(parts, [LEFT, RIGHT])
    _check_dtypes(out)
    assert len(out) == (0 if which == "all" else 1)
    assert len(merge_frame([_dets()], [LEFT])) == 0


def test_parts_and_windows_must_match() -> None:
    with pytest.raises(ValueError, match="2 detection sets for 3 windows"):
        merge_frame([_dets(), _dets()], GRID[:3])


@pytest.mark.parametrize("full_frame", [False, True])
def test_small_defect_near_a_tile_corner_end_to_end(full_frame: bool) -> None:
    policy = TilingPolicy("on", 200, 200, 0.25, full_frame, 0.5, input_width=64, input_height=64, source="test")
    plan = plan_frame(1000, 800, policy)
    assert plan.windows[0] == (0, 0, 200, 200) and plan.windows[1][0] == 133 and plan.windows[7][:2] == (0, 150)
    true = (180.5, 185.25, 215.75, 210.5)  # over the corner where tiles 0, 1, 7 and 8 meet
    parts, touched = [], 0
    for k, w in enumerate(plan.windows):
        x1, y1, x2, y2 = _clip(true, w)
        keep = x2 - x1 >= 1 and y2 - y1 >= 1
        touched += keep
        parts.append(_dets((x1, y1, x2, y2, 0.5 + 0.01 * k, 0)) if keep else _dets())
    assert touched == 4 + full_frame
    out = merge_frame(parts, plan.windows, match_iou=policy.match_iou)
    assert len(out) == 1
    assert out.boxes_xyxy[0].tolist() == list(true)
    assert out.scores[0] == pytest.approx(max(float(p.scores.max()) for p in parts if len(p)))
    assert verdict(out, VerdictRule(), ["scratch", "dent"]) == "NG"
