"""Task-aligned assigner and CIoU on hand-worked cases."""

from __future__ import annotations

import math

import pytest
import torch

from train.assign import TaskAlignedAssigner, bbox_iou


def test_iou_and_ciou_hand_values() -> None:
    a = torch.tensor([0.0, 0.0, 2.0, 2.0])
    b = torch.tensor([1.0, 1.0, 3.0, 3.0])
    # inter 1, union 7; enclosing 3x3 -> c^2 18; centre distance^2 2; same aspect -> v = 0.
    assert bbox_iou(a, b, ciou=False).item() == pytest.approx(1 / 7, abs=1e-6)
    assert bbox_iou(a, b).item() == pytest.approx(1 / 7 - 2 / 18, abs=1e-6)

    c = torch.tensor([0.0, 0.0, 2.0, 1.0])
    d = torch.tensor([0.0, 0.0, 1.0, 1.0])
    iou = 0.5
    v = 4 / math.pi**2 * (math.atan(1.0) - math.atan(2.0)) ** 2
    alpha = v / (v - iou + 1)
    expected = iou - (0.25 / 5 + v * alpha)  # centres (1, .5) vs (.5, .5); enclosing 2x1
    assert bbox_iou(c, d).item() == pytest.approx(expected, abs=1e-6)
    assert bbox_iou(a, a).item() == pytest.approx(1.0, abs=1e-6)


def _grid(n: int = 4, stride: float = 8.0) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(n) + 0.5, torch.arange(n) + 0.5, indexing="ij")
    return torch.stack((xs, ys), -1).view(-1, 2) * stride  # (16, 2) pixels, row-major


def test_topk_and_target_scores_hand_worked() -> None:
    anchors = _grid()
    gt = torch.tensor([[[0.0, 0.0, 16.0, 16.0]]])  # covers anchors 0, 1, 4, 5 (centres 4 and 12)
    pd_boxes = gt.expand(1, 16, 4).clone()  # perfect boxes everywhere -> CIoU 1
    scores = torch.zeros(1, 16, 2)
    scores[0, [0, 1, 4, 5], 1] = torch.tensor([0.25, 0.81, 0.04, 0.01])
    scores[0, 2, 1] = 0.99  # outside the GT: never a candidate
    assigner = TaskAlignedAssigner(2, topk=2, alpha=0.5, beta=6.0)
    res = assigner(scores, pd_boxes, anchors, torch.tensor([[1]]), gt, torch.tensor([[True]]))
    # metric = sqrt(s) * 1^6 = 0.5, 0.9, 0.2, 0.1 -> top-2 = anchors 1 and 0.
    assert res.fg_mask[0].nonzero().flatten().tolist() == [0, 1]
    assert res.labels[0, 1].item() == 1
    # normalised: metric * max IoU (1) / max metric (0.9)
    assert res.scores[0, 1, 1].item() == pytest.approx(1.0, abs=1e-6)
    assert res.scores[0, 0, 1].item() == pytest.approx(0.5 / 0.9, abs=1e-6)
    assert res.scores[0, :, 0].abs().sum().item() == 0.0
    assert res.scores[0, 4:].abs().sum().item() == 0.0
    assert torch.equal(res.bboxes[0, 0], gt[0, 0])


def test_anchor_claimed_by_two_gts_goes_to_higher_iou() -> None:
    anchors = _grid()
    gts = torch.tensor([[[0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 24.0, 24.0]]])
    pd_boxes = torch.tensor([0.0, 0.0, 15.0, 15.0]).expand(1, 16, 4).clone()  # closer to GT 0
    scores = torch.full((1, 16, 3), 0.5)
    assigner = TaskAlignedAssigner(3, topk=10)
    res = assigner(scores, pd_boxes, anchors, torch.tensor([[0, 2]]), gts, torch.tensor([[True, True]]))
    # anchors 0,1,4,5 are inside both GTs -> GT 0 (higher IoU); 2, 6, 8, 9, 10 only inside GT 1.
    assert res.gt_index[0, [0, 1, 4, 5]].tolist() == [0, 0, 0, 0]
    assert res.labels[0, [0, 1, 4, 5]].tolist() == [0, 0, 0, 0]
    assert res.gt_index[0, [2, 6, 8, 9, 10]].tolist() == [1] * 5
    assert res.labels[0, [2, 6, 8, 9, 10]].tolist() == [2] * 5
    assert res.fg_mask.sum().item() == 9


def test_padding_and_empty_targets() -> None:
    anchors = _grid()
    scores = torch.full((2, 16, 2), 0.5)
    boxes = torch.tensor([0.0, 0.0, 16.0, 16.0]).expand(2, 16, 4).clone()
    gts = torch.tensor([[[0.0, 0.0, 16.0, 16.0]], [[0.0, 0.0, 16.0, 16.0]]])
    res = TaskAlignedAssigner(2)(scores, boxes, anchors, torch.tensor([[0], [0]]), gts, torch.tensor([[True], [False]]))
    assert res.fg_mask[0].sum().item() == 4
    assert res.fg_mask[1].sum().item() == 0  # padded GT row is ignored
    empty = TaskAlignedAssigner(2)(
        scores, boxes, anchors, torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, 4), torch.zeros(2, 0).bool()
    )
    assert not empty.fg_mask.any() and empty.scores.abs().sum().item() == 0.0
