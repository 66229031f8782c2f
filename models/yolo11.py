"""The ``Detector`` model class (a layer graph ending in a detect head) and the YOLO11 n/s builders.

YOLO11: Ultralytics YOLO11 (Jocher & Qiu, 2024), layer table in docs/models.md, design note D2. The graph is a plain
Python list of ``(from, module)`` layers stored at ``model.<index>``, so state_dict keys match converted YOLO11 weights
(``model.23.cv3.1.0.0.conv.weight``; design note D2.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from models.backbone import SCALES, Layer, YOLO11Config, yolo11_backbone
from models.head import Detect, DetectBase
from models.neck import UpsampleFactory, c3k2_block, nearest_upsample, pan_fpn

__all__ = [
    "Detector",
    "InferenceModel",
    "yolo11",
    "yolo11_layers",
    "yolo11l",
    "yolo11m",
    "yolo11n",
    "yolo11s",
    "yolo11x",
]

_STRIDE_PROBE = 256  # side of the zero image used to discover the strides at build time


class Detector(nn.Module):
    """A one-stage anchor-free detector: layers ``model.0 ... model.N`` with a detect head as the last layer.

    ``forward(x)`` takes ``(B, 3, H, W)`` float RGB in [0, 1] (H, W multiples of 32) and returns the raw per-level maps
    ``[(B, 4*reg_max + nc, H/s, W/s) for s in stride]`` in both train and eval mode; ``decode`` turns them into
    ``(B, 4 + nc, A)`` (cx, cy, w, h in input pixels + sigmoid scores). Loss and NMS live outside the model.
    """

    stride: torch.Tensor

    def __init__(self, layers: Sequence[Layer], *, variant: str, nc: int, default_box_loss: str = "ciou") -> None:
        super().__init__()
        head = layers[-1][1]
        if not isinstance(head, DetectBase):
            raise TypeError(f"the last layer must be a detect head, got {type(head).__name__}")
        self.variant = variant
        self.nc = nc
        self.reg_max = head.reg_max
        self.default_box_loss = default_box_loss
        self.model_kwargs: dict[str, Any] = {}
        self.fused = False
        self.model = nn.ModuleList(module for _, module in layers)
        self.sources: tuple[int | tuple[int, ...], ...] = tuple(src for src, _ in layers)
        self._keep = {j for src in self.sources for j in (src if isinstance(src, tuple) else (src,)) if j >= 0}
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps, m.momentum = 1e-3, 0.03
        self.register_buffer("stride", self._discover_strides(), persistent=False)
        head.stride.copy_(self.stride)
        head.bias_init()

    @property
    def head(self) -> DetectBase:
        head = self.model[-1]
        assert isinstance(head, DetectBase)
        return head

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs: list[Any] = []
        y: Any = x
        for i, (module, src) in enumerate(zip(self.model, self.sources, strict=True)):
            if isinstance(src, tuple):
                y = [y if j == -1 else outputs[j] for j in src]
            elif src != -1:
                y = outputs[src]
            y = module(y)
            outputs.append(y if i in self._keep else None)
        return list(y)

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Raw maps from ``forward`` -> ``(B, 4 + nc, A)``; A = sum of H_i * W_i (8400 at 640 x 640)."""
        return self.head.decode(feats)

    def set_epoch(self, epoch: int) -> None:
        """Tell epoch-dependent layers (the GRACE Lite-FEN ramp) the current 0-based epoch; no-op elsewhere."""
        for m in self.modules():
            if m is not self and callable(set_epoch := getattr(m, "set_epoch", None)):
                set_epoch(epoch)

    @torch.no_grad()
    def _discover_strides(self) -> torch.Tensor:
        was_training = self.training
        self.eval()  # eval: the probe must not touch the BatchNorm running statistics
        feats = self.forward(torch.zeros(1, 3, _STRIDE_PROBE, _STRIDE_PROBE))
        self.train(was_training)
        return torch.tensor([_STRIDE_PROBE / f.shape[-2] for f in feats], dtype=torch.float32)


class InferenceModel(nn.Module):
    """The exported graph: ``(B, 3, H, W)`` float RGB in [0, 1] -> ``(B, 4 + nc, A)`` decoded boxes and scores."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.detector.decode(self.detector(x))


def yolo11_layers(
    cfg: YOLO11Config, make_upsample: UpsampleFactory = nearest_upsample
) -> tuple[list[Layer], list[int], tuple[int, int, int]]:
    """YOLO11 layers 0-22 (backbone + neck), channels per layer and the P3/P4/P5 output indices (16, 19, 22)."""
    layers, ch = yolo11_backbone(cfg)
    neck, outs = pan_fpn(cfg, ch, (4, 6, 10), c3k2_block(cfg), make_upsample)
    return layers + neck, ch, outs


def yolo11(scale: str, nc: int, variant: str) -> Detector:
    """YOLO11 at ``scale`` (n, s, m, l or x): layers 0-22 + ``Detect`` at layer 23."""
    layers, ch, outs = yolo11_layers(SCALES[scale])
    layers.append((outs, Detect(nc, [ch[i] for i in outs])))
    return Detector(layers, variant=variant, nc=nc)


def yolo11n(nc: int = 6) -> Detector:
    """YOLO11n: 2,591,010 parameters at nc=6 (2,624,080 at nc=80)."""
    return yolo11("n", nc, "yolo11n")


def yolo11s(nc: int = 6) -> Detector:
    """YOLO11s: 9,430,114 parameters at nc=6 (9,458,752 at nc=80)."""
    return yolo11("s", nc, "yolo11s")


def yolo11m(nc: int = 6) -> Detector:
    """YOLO11m: 20,114,688 parameters at nc=80."""
    return yolo11("m", nc, "yolo11m")


def yolo11l(nc: int = 6) -> Detector:
    """YOLO11l: 25,372,160 parameters at nc=80."""
    return yolo11("l", nc, "yolo11l")


def yolo11x(nc: int = 6) -> Detector:
    """YOLO11x: 56,966,176 parameters at nc=80."""
    return yolo11("x", nc, "yolo11x")
