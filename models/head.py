"""Decoupled YOLO11 detect head (raw per-level maps) and the box decode that goes into the exported graph.

Follows the anchor-free YOLOv8/YOLO11 head (Ultralytics, 2023-2024): a DFL box branch (4 x reg_max bins) and a
classification branch per level; ``decode`` turns the raw maps into ``(B, 4 + nc, A)`` = cx, cy, w, h in input pixels
plus per-class sigmoid scores. Our own code, written from docs/models.md, design note D1.1.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import nn

from models.blocks import DFL, Conv, DWConv

__all__ = ["Detect", "DetectBase", "dist2bbox", "make_anchors"]


def make_anchors(
    feats: Sequence[torch.Tensor], strides: torch.Tensor | Sequence[float], offset: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor centres for every level, in grid units of their own level.

    Args:
        feats: per-level maps ``(B, C, H_i, W_i)``, P3 first.
        strides: stride of each level in input pixels.
        offset: 0.5 puts anchors at pixel centres.

    Returns:
        ``anchor_points (A, 2)`` as (x, y), row-major within a level (y outer, x inner), levels concatenated, and
        ``stride_tensor (A, 1)``; both in the dtype/device of ``feats[0]``.
    """
    dtype, device = feats[0].dtype, feats[0].device
    # indexed, never iterated or converted to Python numbers: tracing for ONNX stays exact and quiet
    if isinstance(strides, torch.Tensor):
        strides = strides.to(dtype=dtype, device=device)
    else:
        if len(strides) != len(feats):
            raise ValueError(f"{len(feats)} feature maps but {len(strides)} strides")
        strides = torch.tensor([float(s) for s in strides], dtype=dtype, device=device)
    points, stride_cols = [], []
    for i, feat in enumerate(feats):
        h, w = feat.shape[-2:]
        sx = torch.arange(w, device=device, dtype=dtype) + offset
        sy = torch.arange(h, device=device, dtype=dtype) + offset
        gy, gx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((gx, gy), -1).view(-1, 2))
        stride_cols.append(strides[i].expand(h * w, 1))
    return torch.cat(points), torch.cat(stride_cols)


def dist2bbox(distance: torch.Tensor, anchor_points: torch.Tensor, xywh: bool = True, dim: int = -1) -> torch.Tensor:
    """(left, top, right, bottom) distances from anchor points -> boxes (cx, cy, w, h) or (x1, y1, x2, y2)."""
    lt, rb = distance.chunk(2, dim)
    x1y1 = anchor_points - lt
    x2y2 = anchor_points + rb
    if xywh:
        return torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), dim)
    return torch.cat((x1y1, x2y2), dim)


def _final_bias(branch: nn.Module) -> torch.Tensor:
    """The bias of a branch's last layer, a biased ``nn.Conv2d``."""
    last = list(branch.children())[-1]
    assert isinstance(last, nn.Conv2d) and last.bias is not None
    return last.bias


class DetectBase(nn.Module, ABC):
    """What every detect head shares: ``nc``, ``reg_max``, the DFL, the strides and ``decode``.

    Subclasses build their branches and implement ``forward(feats) -> list[(B, 4*reg_max + nc, H_i, W_i)]`` and
    ``bias_init()``. ``stride`` is a non-persistent buffer: set once at build time, never in the state_dict.
    """

    stride: torch.Tensor

    def __init__(self, nc: int, nl: int, reg_max: int = 16) -> None:
        super().__init__()
        if nc < 1:
            raise ValueError(f"nc must be >= 1, got {nc}")
        self.nc = nc
        self.nl = nl
        self.reg_max = reg_max
        self.no = nc + 4 * reg_max
        self.register_buffer("stride", torch.zeros(nl), persistent=False)
        self.dfl = DFL(reg_max)

    @abstractmethod
    def bias_init(self) -> None:
        """Initialise the last-layer biases once the strides are known."""

    def decode(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Raw per-level maps -> ``(B, 4 + nc, A)``: cx, cy, w, h in input pixels, then sigmoid class scores."""
        x = torch.cat([f.flatten(2) for f in feats], 2)  # (B, no, A)
        box, cls = x.split((4 * self.reg_max, self.nc), 1)  # type: ignore[no-untyped-call]  # unannotated in torch
        anchors, strides = make_anchors(feats, self.stride, 0.5)
        boxes = dist2bbox(self.dfl(box), anchors.transpose(0, 1).unsqueeze(0), xywh=True, dim=1)
        return torch.cat((boxes * strides.transpose(0, 1), cls.sigmoid()), 1)


class Detect(DetectBase):
    """YOLO11 head: per level a box branch (two 3x3 Conv + 1x1 to 4*reg_max) and a depthwise class branch.

    Widths: ``c2 = max(16, ch[0] // 4, 4 * reg_max)``, ``c3 = max(ch[0], min(nc, 100))``. ``depthwise_cls=False`` gives
    the YOLOv8 head, whose class branch is two plain 3x3 Convs (keys ``cv3.<i>.0.conv``, not ``cv3.<i>.0.0.conv``).
    """

    def __init__(self, nc: int, ch: Sequence[int], reg_max: int = 16, *, depthwise_cls: bool = True) -> None:
        super().__init__(nc, len(ch), reg_max)
        c2 = max(16, ch[0] // 4, 4 * reg_max)
        c3 = max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(c, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1)) for c in ch
        )
        self.cv3 = nn.ModuleList(
            nn.Sequential(
                nn.Sequential(DWConv(c, c, 3), Conv(c, c3, 1)),
                nn.Sequential(DWConv(c3, c3, 3), Conv(c3, c3, 1)),
                nn.Conv2d(c3, nc, 1),
            )
            if depthwise_cls
            else nn.Sequential(Conv(c, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1))
            for c in ch
        )

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat((box(f), cls(f)), 1) for f, box, cls in zip(feats, self.cv2, self.cv3, strict=True)]

    @torch.no_grad()
    def bias_init(self) -> None:
        """Box bias 1.0; class bias log(5 / nc / (640 / stride)^2): ~5 objects per 640 image at the start."""
        for box, cls, s in zip(self.cv2, self.cv3, self.stride.tolist(), strict=True):
            _final_bias(box).fill_(1.0)
            _final_bias(cls).fill_(math.log(5 / self.nc / (640 / s) ** 2))
