"""Anchors and box decoding: the (B, 4 + nc, A) contract that evaluation and the exported graph rely on."""

from __future__ import annotations

import math

import torch

from models import dist2bbox, make_anchors


def test_make_anchors_order_and_strides() -> None:
    feats = [torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 1, 2)]
    points, strides = make_anchors(feats, [8, 16])
    expected = [[0.5, 0.5], [1.5, 0.5], [2.5, 0.5], [0.5, 1.5], [1.5, 1.5], [2.5, 1.5], [0.5, 0.5], [1.5, 0.5]]
    assert points.tolist() == expected  # (x, y), y outer, x inner, levels concatenated
    assert strides.squeeze(1).tolist() == [8.0] * 6 + [16.0] * 2
    assert points.shape == (8, 2) and strides.shape == (8, 1)


def test_dist2bbox_formats() -> None:
    anchor = torch.tensor([[10.0, 20.0]])
    dist = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # left, top, right, bottom
    assert dist2bbox(dist, anchor, xywh=False).tolist() == [[9.0, 18.0, 13.0, 24.0]]
    assert dist2bbox(dist, anchor, xywh=True).tolist() == [[11.0, 21.0, 4.0, 6.0]]


def test_decode_hand_worked_box(built) -> None:
    """One-hot DFL logits at bin k give side distance k cells; class logit 0 gives score 0.5."""
    model = built("yolo11n")
    nc, reg = model.nc, model.reg_max
    feats = [torch.zeros(1, 4 * reg + nc, 64 // s, 64 // s) for s in (8, 16, 32)]
    box = torch.full((4, reg), -1e4)
    for side, k in enumerate((1, 2, 3, 4)):  # l, t, r, b in grid cells
        box[side, k] = 1e4
    feats[0][0, : 4 * reg, 2, 5] = box.flatten()
    out = model.decode(feats)
    assert out.shape == (1, 4 + nc, 64 + 16 + 4)
    anchor = 2 * 8 + 5  # row-major index of (y=2, x=5) on the 8x8 P3 grid
    cx, cy = (5.5 + (3 - 1) / 2) * 8, (2.5 + (4 - 2) / 2) * 8
    torch.testing.assert_close(out[0, :4, anchor], torch.tensor([cx, cy, 4 * 8.0, 6 * 8.0]))
    assert torch.allclose(out[0, 4:], torch.full_like(out[0, 4:], 0.5))
    # a uniform distribution decodes to the mean bin (7.5 cells per side) at every other anchor
    assert math.isclose(out[0, 2, 0].item(), 15 * 8.0, rel_tol=1e-5)
