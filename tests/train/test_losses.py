"""Loss values on hand-worked cases: BCE, CIoU, DFL, Wise-IoU v3 (and its frozen running mean)."""

from __future__ import annotations

import math

import pytest
import torch

from train.losses import DetectionLoss, WiseIoU, dfl_loss, wiou_momentum


def test_dfl_hand_value() -> None:
    logits = torch.tensor([[0.0, math.log(2.0), 0.0, 0.0]]).repeat(4, 1)[None]  # p = (.2, .4, .2, .2)
    target = torch.full((1, 4), 1.25)  # bins 1 (weight .75) and 2 (weight .25)
    expected = 0.75 * -math.log(0.4) + 0.25 * -math.log(0.2)
    assert dfl_loss(logits, target).item() == pytest.approx(expected, abs=1e-6)


def _wiou_expected(l_iou: float, mean: float, centre_d2: float, wg: float, hg: float) -> float:
    beta = l_iou / mean
    r = beta / (3.0 * 1.9 ** (beta - 3.0))
    return r * math.exp(centre_d2 / (wg**2 + hg**2)) * l_iou


def test_wiou3_formula_and_running_mean() -> None:
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    l_iou = 6 / 7  # IoU 1/7; centres 2 apart squared; enclosing 3x3
    loss = WiseIoU(alpha=1.9, delta=3.0, momentum=0.1)
    loss.eval()
    assert loss(pred, target).item() == pytest.approx(_wiou_expected(l_iou, 1.0, 2.0, 3, 3), rel=1e-5)
    assert loss.iou_mean.item() == 1.0  # frozen outside training
    loss.train()
    value = loss(pred, target).item()
    mean = 0.9 * 1.0 + 0.1 * l_iou
    assert loss.iou_mean.item() == pytest.approx(mean, rel=1e-6)
    assert value == pytest.approx(_wiou_expected(l_iou, mean, 2.0, 3, 3), rel=1e-5)
    assert "iou_mean" in loss.state_dict()
    # r = 1 exactly when beta = delta
    loss.eval()
    loss.iou_mean.fill_(l_iou / 3.0)
    assert loss(pred, target).item() == pytest.approx(math.exp(2 / 18) * l_iou, rel=1e-5)
    assert wiou_momentum(90, 40) == pytest.approx(1 - 0.05 ** (1 / (90 * 12)))  # t = 30% of 40 epochs


def _feats(bsz: int, nc: int, fill_cls: float = 0.0) -> list[torch.Tensor]:
    return [torch.zeros(bsz, 64 + nc, s, s).index_fill_(1, torch.arange(64, 64 + nc), fill_cls) for s in (4, 2, 1)]


def test_bce_only_without_targets() -> None:
    nc = 2
    loss_fn = DetectionLoss(nc, torch.tensor([8.0, 16.0, 32.0]))
    total, items, stats = loss_fn(_feats(2, nc), torch.zeros(0, 6))
    anchors = 16 + 4 + 1
    # logit 0 vs target 0: ln 2 per element; sum / max(sum of targets, 1) = 2 * 21 * 2 * ln2; gain 0.5
    expected_cls = 0.5 * 2 * anchors * nc * math.log(2.0)
    assert items.tolist() == pytest.approx([0.0, expected_cls, 0.0], rel=1e-5)
    assert total.item() == pytest.approx(expected_cls * 2, rel=1e-5)  # times the batch size
    assert stats.cls_count.sum().item() == 0


def test_one_target_box_cls_dfl_hand_worked() -> None:
    # One level, stride 8, a 2x2 map: anchors at (4, 4), (12, 4), (4, 12), (12, 12) px. Zero logits: DFL bins uniform
    # -> every side 7.5 cells (60 px), every score sigmoid(0) = 0.5.
    loss_fn = DetectionLoss(1, torch.tensor([8.0]))
    feats = [torch.zeros(1, 64 + 1, 2, 2)]
    total, items, stats = loss_fn(feats, torch.tensor([[0.0, 0.0, 0.0, 0.0, 16.0, 16.0]]))
    # All four anchors lie strictly inside the GT and have the same CIoU with it: IoU = 256 / 120^2, centre distance^2
    # 32 px^2, enclosing box = the 120x120 prediction, same aspect (v = 0).
    ciou = 256 / 120**2 - 32 / (2 * 120**2)
    # Equal metrics m = 0.5^0.5 * ciou^6 -> all four positive; target score = m * max IoU / (max m + 1e-9) (the
    # assigner's eps matters at such tiny metrics); their sum < 1 -> the normaliser is 1.
    metric = 0.5**0.5 * ciou**6
    target = metric * ciou / (metric + 1e-9)
    weight_sum = 4 * target
    box = 4 * (1 - ciou) * target
    cls = 4 * math.log(2.0)  # BCE at logit 0 is ln 2 whatever the target; negatives: none (all 4 anchors positive)
    dfl = weight_sum * math.log(16.0)  # uniform bins: CE = ln 16 for both neighbours of every side
    assert items.tolist() == pytest.approx([7.5 * box, 0.5 * cls, 1.5 * dfl], rel=1e-4)
    assert total.item() == pytest.approx(7.5 * box + 0.5 * cls + 1.5 * dfl, rel=1e-4)
    assert stats.cls_count.tolist() == [4.0]
    assert stats.cls_loss_sum.item() == pytest.approx(4 * math.log(2.0), rel=1e-5)
    assert stats.conf_count.tolist() == [4.0] and stats.conf_sum.item() == pytest.approx(2.0)


def test_wiou_box_loss_selected_and_gradients_flow() -> None:
    loss_fn = DetectionLoss(1, torch.tensor([8.0]), box_loss="wiou3")
    feats = [torch.zeros(1, 65, 2, 2, requires_grad=True)]
    total, _items, _ = loss_fn(feats, torch.tensor([[0.0, 0.0, 0.0, 0.0, 16.0, 16.0]]))
    total.backward()
    assert feats[0].grad is not None and feats[0].grad.abs().sum() > 0
    assert loss_fn.wiou.iou_mean.item() < 1.0  # updated in training mode
    with pytest.raises(ValueError, match="box_loss"):
        DetectionLoss(1, torch.tensor([8.0]), box_loss="giou")
