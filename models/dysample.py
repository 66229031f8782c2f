"""YOLO11-DySample: YOLO11 with both neck upsamplers replaced by DySample.

Papers: "A Screw Surface Defect Detection Model Based on YOLO11-DySample" (Zhu et al., 2025) for the placement;
"Learning to Upsample by Learning to Sample" (Liu et al., ICCV 2023, arXiv 2308.15085) for DySample itself. Written
from the paper and docs/models.md, design note D7 (the reference code, tiny-smart/dysample, is MIT; ours is our own).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import SCALES
from models.head import Detect
from models.yolo11 import Detector, yolo11_layers

__all__ = ["DySample", "dysample_n", "dysample_s"]


class DySample(nn.Module):
    """Point-sampling 2x (``scale``) upsampler: a 1x1 conv predicts per-group sub-pixel offsets, ``grid_sample`` reads.

    Styles: 'lp' (linear then pixel-shuffle; offsets predicted at H x W, ``offset = Conv2d(C, 2*G*s^2)``) and 'pl'
    (pixel-shuffle first; ``offset = Conv2d(C/s^2, 2*G)`` at sH x sW). Static scope multiplies the offsets by 0.25;
    ``dyscope=True`` ("DySample+") by ``0.5 * sigmoid(scope(x))``. With the offset conv zeroed the output equals
    bilinear upsampling (``align_corners=False``), which is what the default N(0, 0.001) init starts close to.
    """

    init_pos: torch.Tensor

    def __init__(
        self, in_channels: int, scale: int = 2, style: str = "lp", groups: int = 4, dyscope: bool = False
    ) -> None:
        super().__init__()
        if style not in ("lp", "pl"):
            raise ValueError(f"DySample style must be 'lp' or 'pl', got {style!r}")
        if in_channels % groups:
            raise ValueError(f"DySample needs in_channels ({in_channels}) divisible by groups ({groups})")
        if style == "pl" and in_channels % (scale * scale):
            raise ValueError(f"DySample 'pl' needs in_channels ({in_channels}) divisible by scale^2 ({scale**2})")
        self.scale = scale
        self.style = style
        self.groups = groups
        c_in = in_channels // scale**2 if style == "pl" else in_channels
        c_out = 2 * groups if style == "pl" else 2 * groups * scale**2
        self.offset = nn.Conv2d(c_in, c_out, 1)
        nn.init.normal_(self.offset.weight, std=0.001)
        assert self.offset.bias is not None  # built with a bias
        nn.init.zeros_(self.offset.bias)
        self.scope: nn.Conv2d | None = None
        if dyscope:
            self.scope = nn.Conv2d(c_in, c_out, 1, bias=False)
            nn.init.zeros_(self.scope.weight)
        self.register_buffer("init_pos", self._init_pos())

    def _init_pos(self) -> torch.Tensor:
        """(1, 2*G*s^2, 1, 1) sub-pixel start offsets; channels ordered [x, y] x group x sub-row i x sub-col j."""
        s = self.scale
        h = (torch.arange(s, dtype=torch.float32) - (s - 1) / 2) / s  # s=2: (-0.25, 0.25)
        xs = h.view(1, s).expand(s, s)  # varies with the sub-column j
        ys = h.view(s, 1).expand(s, s)  # varies with the sub-row i
        pos = torch.stack((xs, ys)).unsqueeze(1).expand(2, self.groups, s, s)
        return pos.reshape(1, -1, 1, 1).clone()

    def _offsets(self, x: torch.Tensor) -> torch.Tensor:
        o: torch.Tensor = self.offset(x)
        if self.scope is None:
            return o * 0.25
        scope: torch.Tensor = self.scope(x)
        return o * scope.sigmoid() * 0.5

    def sample(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Read ``x (B, C, H, W)`` at pixel centres + ``offset (B, 2*G*s^2, H, W)`` -> ``(B, C, sH, sW)``."""
        b, _, h, w = offset.shape
        s, g = self.scale, self.groups
        offset = offset.view(b, 2, -1, h, w)
        cx = torch.arange(w, dtype=x.dtype, device=x.device) + 0.5
        cy = torch.arange(h, dtype=x.dtype, device=x.device) + 0.5
        gy, gx = torch.meshgrid(cy, cx, indexing="ij")
        # pixel positions -> grid_sample's [-1, 1] frame (align_corners=False)
        nx = (gx + offset[:, 0]) * (2.0 / w) - 1
        ny = (gy + offset[:, 1]) * (2.0 / h) - 1
        coords = F.pixel_shuffle(torch.stack((nx, ny), 1).view(b, -1, h, w), s)  # (B, 2*G, sH, sW)
        grid = coords.view(b, 2, g, s * h, s * w).permute(0, 2, 3, 4, 1).reshape(b * g, s * h, s * w, 2)
        out = F.grid_sample(
            x.reshape(b * g, -1, x.shape[-2], x.shape[-1]),
            grid,
            mode="bilinear",
            align_corners=False,
            padding_mode="border",
        )
        return out.view(b, -1, s * h, s * w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "pl":
            offset = F.pixel_unshuffle(self._offsets(F.pixel_shuffle(x, self.scale)), self.scale) + self.init_pos
        else:
            offset = self._offsets(x) + self.init_pos
        return self.sample(x, offset)


def _dysample(scale: str, nc: int, variant: str, style: str, groups: int, dyscope: bool) -> Detector:
    layers, ch, outs = yolo11_layers(SCALES[scale], lambda c: DySample(c, 2, style, groups, dyscope))
    layers.append((outs, Detect(nc, [ch[i] for i in outs])))
    return Detector(layers, variant=variant, nc=nc)


def dysample_n(nc: int = 6, style: str = "lp", groups: int = 4, dyscope: bool = False) -> Detector:
    """YOLO11n-DySample ('lp', 4 groups, static scope): 2,603,362 parameters at nc=6."""
    return _dysample("n", nc, "dysample-n", style, groups, dyscope)


def dysample_s(nc: int = 6, style: str = "lp", groups: int = 4, dyscope: bool = False) -> Detector:
    """YOLO11s-DySample ('lp', 4 groups, static scope): 9,454,754 parameters at nc=6."""
    return _dysample("s", nc, "dysample-s", style, groups, dyscope)
