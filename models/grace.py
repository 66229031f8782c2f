"""GRACE: YOLO11 + Lite-FEN (lightweight channel/spatial attention with a ramped residual) at P3.

Paper: Chen et al., "GRACE: Gradient-Reweighting with Awareness of Confidence and Lightweight Feature Enhancement for
steel surface defect detection", Sci. Rep. 2026 (Methods, "Lightweight feature enhancement network", eqs. 11-14).
DS-CBSM++, the paper's other half, is a training-time sampler and lives in ``train/sampler.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from models.backbone import SCALES
from models.head import Detect
from models.yolo11 import Detector, yolo11_layers

__all__ = ["LiteFEN", "grace_n", "grace_s", "lite_fen_strength"]


def lite_fen_strength(
    epoch: int, s_base: float = 0.20, s_min: float = 0.05, s_max: float = 0.30, e_ramp: int = 30
) -> float:
    """Residual strength for 0-based ``epoch``: ``clip(s_base * min(1, (e + 1) / E_ramp), s_min, s_max)`` (eqs. 12-13).

    With the paper's constants: 0.05 for epochs 0-6 (the floor), then linear up to 0.20 from epoch 29 on.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    s_e = s_base * min(1.0, (epoch + 1) / e_ramp)
    return min(max(s_e, s_min), s_max)


class LiteFEN(nn.Module):
    """``y = x + s_e * (x * att(x))``, ``att = 0.5 * CA(x) + 0.5 * SA(x)`` (eqs. 11, 14).

    CA: GAP -> 1x1 (C -> C/r) -> SiLU -> 1x1 (C/r -> C) -> Sigmoid, shape (B, C, 1, 1). SA: 3x3 depthwise -> 1x1
    (C -> 1) -> Sigmoid, shape (B, 1, H, W). The paper does not say whether the convs carry biases or BN: we use
    plain biased convs (9,761 parameters at C = 128). ``s_e`` is a non-learned buffer (in the state_dict) that
    ``set_epoch`` moves along the ramp; a new module starts at the epoch-0 value so a fresh model trains as published.
    """

    s_e: torch.Tensor

    def __init__(
        self, c: int, r: int = 4, s_base: float = 0.20, s_min: float = 0.05, s_max: float = 0.30, e_ramp: int = 30
    ) -> None:
        super().__init__()
        self.ca = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c // r, 1), nn.SiLU(), nn.Conv2d(c // r, c, 1), nn.Sigmoid()
        )
        self.sa = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, groups=c), nn.Conv2d(c, 1, 1), nn.Sigmoid())
        self.s_base, self.s_min, self.s_max, self.e_ramp = s_base, s_min, s_max, e_ramp
        self.register_buffer("s_e", torch.tensor(lite_fen_strength(0, s_base, s_min, s_max, e_ramp)))

    def set_epoch(self, epoch: int) -> None:
        """Set ``s_e`` for the 0-based ``epoch`` (called by the trainer at the start of every epoch)."""
        self.s_e.fill_(lite_fen_strength(epoch, self.s_base, self.s_min, self.s_max, self.e_ramp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att: torch.Tensor = 0.5 * self.ca(x) + 0.5 * self.sa(x)  # broadcast to (B, C, H, W)
        return x + self.s_e * (x * att)


def _grace(scale: str, nc: int, variant: str) -> Detector:
    """Layers 0-22 = YOLO11; 23 = LiteFEN on P3 (layer 16); 24 = Detect on (23, 19, 22)."""
    layers, ch, (p3, p4, p5) = yolo11_layers(SCALES[scale])
    layers.append((p3, LiteFEN(ch[p3])))
    layers.append(((len(layers) - 1, p4, p5), Detect(nc, [ch[p3], ch[p4], ch[p5]])))
    return Detector(layers, variant=variant, nc=nc)


def grace_n(nc: int = 6) -> Detector:
    """GRACE at YOLO11n scale (not in the paper; offered for small devices): 2,593,843 parameters at nc=6."""
    return _grace("n", nc, "grace-n")


def grace_s(nc: int = 6) -> Detector:
    """GRACE as published (YOLO11s + Lite-FEN at P3): 9,439,875 parameters at nc=6."""
    return _grace("s", nc, "grace-s")
