"""Paper-specific blocks: DySample (zero offset == bilinear), the Lite-FEN ramp, GMS2 blocks, YOLO11 block widths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models
from models.blocks import C3k2
from models.dysample import DySample
from models.gms2 import DetectLSCSBD, GhostHGBlock, HGStem, MANetStar
from models.grace import LiteFEN, lite_fen_strength


def _bilinear(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


@pytest.mark.parametrize(("style", "dyscope"), [("lp", False), ("lp", True), ("pl", False), ("pl", True)])
def test_dysample_zero_offset_is_bilinear(style: str, dyscope: bool) -> None:
    torch.manual_seed(0)
    up = DySample(64, 2, style, groups=4, dyscope=dyscope)
    torch.nn.init.zeros_(up.offset.weight)
    x = torch.randn(2, 64, 9, 7)
    with torch.no_grad():
        diff = (up(x) - _bilinear(x)).abs().max().item()
    assert diff < 1e-5


def test_dysample_default_init_is_near_bilinear_but_learnable() -> None:
    torch.manual_seed(0)
    up = DySample(32)
    x = torch.randn(1, 32, 8, 8)
    y = up(x)
    assert y.shape == (1, 32, 16, 16)
    assert 0 < (y - _bilinear(x)).abs().max().item() < 0.05
    y.square().sum().backward()
    assert up.offset.weight.grad is not None and up.offset.weight.grad.abs().sum() > 0


def test_dysample_init_pos_layout_and_params() -> None:
    up = DySample(256)
    pos = up.init_pos.view(2, 4, 2, 2)  # component, group, sub-row, sub-col
    assert torch.equal(pos[0, :, 0], torch.tensor([[-0.25, 0.25]] * 4))  # x varies with the sub-column
    assert torch.equal(pos[1, :, :, 0], torch.tensor([[-0.25, 0.25]] * 4))  # y varies with the sub-row
    assert sum(p.numel() for p in up.parameters()) == 32 * (256 + 1)
    assert sum(p.numel() for p in DySample(256, style="pl").parameters()) == 8 * (256 // 4 + 1)
    assert "init_pos" in up.state_dict()


def test_dysample_rejects_bad_channels() -> None:
    with pytest.raises(ValueError, match="groups"):
        DySample(30, groups=4)
    with pytest.raises(ValueError, match="style"):
        DySample(32, style="nearest")


def test_dysample_replaces_both_neck_upsamplers(built) -> None:
    model = built("dysample-n")
    assert isinstance(model.model[11], DySample) and isinstance(model.model[14], DySample)
    assert (model.model[11].offset.in_channels, model.model[14].offset.in_channels) == (256, 128)


@pytest.mark.parametrize(("epoch", "expected"), [(0, 0.05), (6, 0.05), (7, 0.2 * 8 / 30), (29, 0.20), (100, 0.20)])
def test_lite_fen_ramp(epoch: int, expected: float) -> None:
    assert lite_fen_strength(epoch) == pytest.approx(expected)


def test_lite_fen_ramp_is_clipped_by_s_max() -> None:
    assert lite_fen_strength(50, s_base=0.5) == pytest.approx(0.30)
    with pytest.raises(ValueError):
        lite_fen_strength(-1)


def test_grace_set_epoch_moves_the_buffer(built) -> None:
    model = built("grace-s")
    fen = model.model[23]
    assert isinstance(fen, LiteFEN)
    assert fen.s_e.item() == pytest.approx(0.05)
    for epoch, value in [(0, 0.05), (6, 0.05), (29, 0.20), (100, 0.20)]:
        model.set_epoch(epoch)
        assert model.state_dict()["model.23.s_e"].item() == pytest.approx(value)
    assert not any("s_e" in n for n, _ in model.named_parameters())
    models.create_model("yolo11n").set_epoch(5)  # a no-op elsewhere, must not fail


def test_lite_fen_formula() -> None:
    torch.manual_seed(0)
    fen = LiteFEN(16).eval()
    fen.set_epoch(29)
    x = torch.randn(2, 16, 5, 5)
    att = 0.5 * fen.ca(x) + 0.5 * fen.sa(x)
    torch.testing.assert_close(fen(x), x + 0.2 * x * att)
    assert sum(p.numel() for p in LiteFEN(128).parameters()) == 9_761


def test_c3k2_inner_bottleneck_is_half_width() -> None:
    block = C3k2(64, 128, n=1, c3k=False, e=0.25)  # c = 32, inner 3x3 convs at 16 channels
    assert block.m[0].cv1.conv.out_channels == 16
    assert sum(p.numel() for p in block.parameters()) == 26_080


def test_gms2_block_param_counts() -> None:
    assert sum(p.numel() for p in HGStem(3, 8, 16).parameters()) == 1_840
    assert sum(p.numel() for p in GhostHGBlock(128, 48, 256, 5, 3, lightconv=True).parameters()) == 204_840
    assert sum(p.numel() for p in MANetStar(256, 64, 1, p=2, kernel_size=3).parameters()) == 55_712
    assert sum(p.numel() for p in DetectLSCSBD(6, 64, (64, 128, 256)).parameters()) == 304_857


def test_hgstem_stride_four_any_size() -> None:
    with torch.no_grad():
        assert HGStem(3, 8, 16)(torch.rand(1, 3, 96, 64)).shape == (1, 16, 24, 16)


def test_lscsbd_scale_multiplies_box_logits_only(built) -> None:
    model = built("gms2-n")
    head = model.head
    assert isinstance(head, DetectLSCSBD)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        head.scale[1].scale.fill_(2.0)
        after = model(x)
    torch.testing.assert_close(after[1][:, :64], 2 * before[1][:, :64])
    torch.testing.assert_close(after[1][:, 64:], before[1][:, 64:])
    torch.testing.assert_close(after[0], before[0])
