"""GMS2-YOLO: YOLO11n with a GHGNet backbone, an MSNet (MANet + StarBlock) neck and a separated-BN shared head.

Paper: "GMS2-YOLO" metal-surface defect detector (Wuhan Univ. of Technology, J. Electronic Measurement and
Instrumentation, B2508416); only the abstract is public, so the layout follows docs/models.md, design note D6 (the
GhostHGNetV2, MAN-Star and LSCSBD YOLO11 configurations combined). Blocks from HGNetV2 (PP-HGNetV2, Baidu), GhostNet
(Han et al., CVPR 2020), MANet (Hyper-YOLO, Feng et al., TPAMI 2024), StarNet ("Rewrite the Stars", Ma et al., CVPR
2024) and the RTMDet-style shared-conv/separate-BN head (Lyu et al., 2022). Its box loss is Wise-IoU v3
(train/losses.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import SCALES, Layer, YOLO11Config
from models.blocks import C2PSA, SPPF, Conv, DWConv
from models.fuse import fold_conv_bn
from models.head import DetectBase
from models.neck import BlockFactory, pan_fpn
from models.yolo11 import Detector

__all__ = [
    "DetectLSCSBD",
    "GhostConv",
    "GhostHGBlock",
    "HGStem",
    "MANetStar",
    "Scale",
    "StarBlock",
    "gms2_n",
    "gms2_s",
]


class GhostConv(nn.Module):
    """Ghost convolution: a primary Conv to c2/2 channels plus a cheap depthwise 5x5 Conv on it, concatenated."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, g: int = 1, act: bool | nn.Module = True) -> None:
        super().__init__()
        c_ = c2 // 2
        self.cv1 = Conv(c1, c_, k, s, None, g, act=act)
        self.cv2 = Conv(c_, c_, 5, 1, None, c_, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv1(x)
        return torch.cat((y, self.cv2(y)), 1)


class HGStem(nn.Module):
    """PP-HGNetV2 stem (stride 4, ReLU): 3x3/2 conv, a 2x2 conv pair in parallel with a 2x2 max-pool, 3x3/2, 1x1."""

    def __init__(self, c1: int, cm: int, c2: int) -> None:
        super().__init__()
        self.stem1 = Conv(c1, cm, 3, 2, act=nn.ReLU())
        self.stem2a = Conv(cm, cm // 2, 2, 1, 0, act=nn.ReLU())
        self.stem2b = Conv(cm // 2, cm, 2, 1, 0, act=nn.ReLU())
        self.stem3 = Conv(cm * 2, cm, 3, 2, act=nn.ReLU())
        self.stem4 = Conv(cm, c2, 1, 1, act=nn.ReLU())
        self.pool = nn.MaxPool2d(kernel_size=2, stride=1, padding=0, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(self.stem1(x), [0, 1, 0, 1])
        x2 = self.stem2b(F.pad(self.stem2a(x), [0, 1, 0, 1]))
        return cast(torch.Tensor, self.stem4(self.stem3(torch.cat((self.pool(x), x2), 1))))


class GhostHGBlock(nn.Module):
    """HGNetV2 block with GhostConv as its light conv ("GHG" block), SiLU throughout.

    ``n`` chained k x k blocks (GhostConv when ``lightconv`` else Conv), all outputs concatenated with the input,
    squeezed by a 1x1 to c2/2 and excited by a 1x1 to c2; residual when ``shortcut`` and c1 == c2.
    """

    def __init__(
        self, c1: int, cm: int, c2: int, k: int = 3, n: int = 6, lightconv: bool = False, shortcut: bool = False
    ) -> None:
        super().__init__()
        block = GhostConv if lightconv else Conv
        self.m = nn.ModuleList(block(c1 if i == 0 else cm, cm, k=k) for i in range(n))
        self.sc = Conv(c1 + n * cm, c2 // 2, 1, 1)
        self.ec = Conv(c2 // 2, c2, 1, 1)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys = [x]
        for block in self.m:
            ys.append(block(ys[-1]))
        y: torch.Tensor = self.ec(self.sc(torch.cat(ys, 1)))
        return x + y if self.add else y


class StarBlock(nn.Module):
    """StarNet block: DW7x7+BN, two 1x1 expansions multiplied (ReLU6(f1) * f2), 1x1+BN back, DW7x7, residual."""

    def __init__(self, dim: int, mlp_ratio: int = 3) -> None:
        super().__init__()
        self.dwconv = Conv(dim, dim, 7, g=dim, act=False)
        self.f1 = nn.Conv2d(dim, mlp_ratio * dim, 1)
        self.f2 = nn.Conv2d(dim, mlp_ratio * dim, 1)
        self.g = Conv(mlp_ratio * dim, dim, 1, act=False)
        self.dwconv2 = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x)
        y = self.act(self.f1(y)) * self.f2(y)
        out: torch.Tensor = self.dwconv2(self.g(y))
        return x + out


class MANetStar(nn.Module):
    """MSNet block: Hyper-YOLO's Mixed Aggregation Network with StarBlocks as the chained inner blocks.

    Branches on ``y = cv_first(x)`` (2c channels): a 1x1 (c), a 1x1 -> DW k x k -> 1x1 path of hidden width
    ``int(p * 2c)``, the two channel halves of y, then ``n`` StarBlocks chained on the last piece; all concatenated
    and fused by ``cv_final``.
    """

    def __init__(self, c1: int, c2: int, n: int = 1, p: int = 1, kernel_size: int = 3, e: float = 0.5) -> None:
        super().__init__()
        self.c = int(c2 * e)
        hidden = int(p * 2 * self.c)
        self.cv_first = Conv(c1, 2 * self.c, 1, 1)
        self.cv_final = Conv((4 + n) * self.c, c2, 1)
        self.cv_block_1 = Conv(2 * self.c, self.c, 1, 1)
        self.cv_block_2 = nn.Sequential(
            Conv(2 * self.c, hidden, 1, 1), DWConv(hidden, hidden, kernel_size, 1), Conv(hidden, self.c, 1, 1)
        )
        self.m = nn.ModuleList(StarBlock(self.c) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv_first(x)
        ys = [self.cv_block_1(y), self.cv_block_2(y), *y.chunk(2, 1)]
        for block in self.m:
            ys.append(block(ys[-1]))
        return cast(torch.Tensor, self.cv_final(torch.cat(ys, 1)))


class Scale(nn.Module):
    """A learnable scalar multiplier (init ``value``)."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class DetectLSCSBD(DetectBase):
    """Separated-BN head: per-level 3x3 stem, two convs shared by all levels each followed by the level's own BN.

    Then shared 1x1 box (4*reg_max) and class (nc) convs, and a learnable per-level ``scale`` on the box logits.
    Shared convs keep their bias (as the YOLO11 LSCSBD head, unlike RTMDet). ``fuse()`` folds the per-level BNs by
    duplicating the shared convs once per level, so the fused head has three independent conv stacks.
    """

    def __init__(self, nc: int, hidc: int, ch: Sequence[int], reg_max: int = 16) -> None:
        super().__init__(nc, len(ch), reg_max)
        self.conv = nn.ModuleList(Conv(c, hidc, 3) for c in ch)
        self.share_conv: nn.Sequential | None = nn.Sequential(nn.Conv2d(hidc, hidc, 3, 1, 1), nn.Conv2d(hidc, hidc, 1))
        self.separate_bn: nn.ModuleList | None = nn.ModuleList(
            nn.ModuleList(nn.BatchNorm2d(hidc) for _ in range(2)) for _ in ch
        )
        self.fused_levels: nn.ModuleList | None = None
        self.act = nn.SiLU()
        self.cv2 = nn.Conv2d(hidc, 4 * reg_max, 1)
        self.cv3 = nn.Conv2d(hidc, nc, 1)
        self.scale = nn.ModuleList(Scale(1.0) for _ in ch)

    def _shared(self, x: torch.Tensor, level: int) -> torch.Tensor:
        if self.fused_levels is not None:
            return cast(torch.Tensor, self.fused_levels[level](x))
        assert self.share_conv is not None and self.separate_bn is not None
        bns = cast(nn.ModuleList, self.separate_bn[level])
        x = self.act(bns[0](self.share_conv[0](x)))
        return cast(torch.Tensor, self.act(bns[1](self.share_conv[1](x))))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        outs = []
        for i, f in enumerate(feats):
            x = self._shared(self.conv[i](f), i)
            outs.append(torch.cat((self.scale[i](self.cv2(x)), self.cv3(x)), 1))
        return outs

    @torch.no_grad()
    def bias_init(self) -> None:
        """Box bias 1.0; class bias for the middle stride (16), the class conv being shared across levels."""
        assert self.cv2.bias is not None and self.cv3.bias is not None  # both convs are built with a bias
        self.cv2.bias.fill_(1.0)
        self.cv3.bias.fill_(math.log(5 / self.nc / (640 / 16) ** 2))

    def fuse(self) -> None:
        """Replace the shared convs + per-level BNs by per-level folded convs (eval statistics)."""
        if self.share_conv is None or self.separate_bn is None:
            return
        conv0, conv1 = (cast(nn.Conv2d, c) for c in self.share_conv)
        levels = [[cast(nn.BatchNorm2d, bn) for bn in cast(nn.ModuleList, bns)] for bns in self.separate_bn]
        self.fused_levels = nn.ModuleList(
            nn.Sequential(fold_conv_bn(conv0, bn0), nn.SiLU(), fold_conv_bn(conv1, bn1), nn.SiLU())
            for bn0, bn1 in levels
        )
        self.share_conv = None
        self.separate_bn = None


def _ghgnet(cfg: YOLO11Config) -> tuple[list[Layer], list[int]]:
    """GHGNet backbone, layers 0-11: HGStem, four Ghost-HGBlock stages with DWConv stride-2 transitions, SPPF, C2PSA.

    GhostConv is used only in the two deep stages (5 x 5 kernels), as in GhostHGNetV2; P3 = 3, P4 = 7, P5 = 11.
    """
    n = cfg.n(6)
    c = cfg.ch
    specs: list[Layer] = []
    ch: list[int] = []

    def add(module: nn.Module, c_out: int) -> None:
        specs.append((-1, module))
        ch.append(c_out)

    add(HGStem(3, c(32), c(48)), c(48))  # 0  P2/4
    add(GhostHGBlock(ch[-1], c(48), c(128), 3, n), c(128))  # 1
    add(DWConv(ch[-1], c(128), 3, 2, act=False), c(128))  # 2  P3/8
    add(GhostHGBlock(ch[-1], c(96), c(512), 3, n), c(512))  # 3
    add(DWConv(ch[-1], c(512), 3, 2, act=False), c(512))  # 4  P4/16
    add(GhostHGBlock(ch[-1], c(192), c(1024), 5, n, lightconv=True), c(1024))  # 5
    add(GhostHGBlock(ch[-1], c(192), c(1024), 5, n, lightconv=True, shortcut=True), c(1024))  # 6
    add(GhostHGBlock(ch[-1], c(192), c(1024), 5, n, lightconv=True, shortcut=True), c(1024))  # 7
    add(DWConv(ch[-1], c(1024), 3, 2, act=False), c(1024))  # 8  P5/32
    add(GhostHGBlock(ch[-1], c(384), c(2048), 5, n, lightconv=True), c(2048))  # 9
    add(SPPF(ch[-1], c(1024), 5), c(1024))  # 10
    add(C2PSA(ch[-1], c(1024), cfg.n(2)), c(1024))  # 11
    return specs, ch


def _msnet_block(cfg: YOLO11Config) -> BlockFactory:
    def make(c1: int, c2: int, stage: int) -> nn.Module:
        del stage  # MSNet uses the same block at every neck position
        return MANetStar(c1, c2, cfg.n(2), p=2, kernel_size=3)

    return make


def _gms2(scale: str, nc: int, variant: str) -> Detector:
    cfg = SCALES[scale]
    layers, ch = _ghgnet(cfg)
    neck, outs = pan_fpn(cfg, ch, (3, 7, 11), _msnet_block(cfg))
    layers += neck
    layers.append((outs, DetectLSCSBD(nc, cfg.ch(256), [ch[i] for i in outs])))
    return Detector(layers, variant=variant, nc=nc, default_box_loss="wiou3")


def gms2_n(nc: int = 6) -> Detector:
    """GMS2-YOLO as published (YOLO11n scale): 3,496,865 parameters at nc=6."""
    return _gms2("n", nc, "gms2-n")


def gms2_s(nc: int = 6) -> Detector:
    """GMS2-YOLO at YOLO11s scale (not in the paper): 13,814,249 parameters at nc=6."""
    return _gms2("s", nc, "gms2-s")
