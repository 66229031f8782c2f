"""YOLO11 backbone (layers 0-10: P1 ... P5, SPPF, C2PSA) as a plain list of ``(from, module)`` layers.

Layer table from Ultralytics ``yolo11.yaml`` as restated in docs/models.md, design note D2; written as Python, not
YAML, so the network can be read and jumped through. Widths and repeats are scaled by ``YOLO11Config``
(design note D1.2).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from models.blocks import C2PSA, SPPF, C3k2, Conv, make_divisible

__all__ = ["Layer", "YOLO11Config", "yolo11_backbone"]

# One network layer: where its input comes from (-1 = previous layer, or a tuple of layer indices) and the module.
Layer = tuple[int | tuple[int, ...], nn.Module]


@dataclass(frozen=True)
class YOLO11Config:
    """Compound scaling of a YOLO graph: ``[depth, width, max_channels]`` (YOLO11n = 0.50, 0.25, 1024).

    YOLOv8 scales with the same two rules (models/yolov8.py); only its table and its blocks differ.
    """

    depth: float
    width: float
    max_channels: int = 1024
    force_c3k: bool = False  # True at scales m/l/x, where every C3k2 uses C3k inner blocks

    def ch(self, c: int) -> int:
        """Output channels of a layer written as ``c`` in the unscaled table."""
        return make_divisible(min(c, self.max_channels) * self.width, 8)

    def n(self, repeats: int) -> int:
        """Repeats passed into a CSP block written as ``repeats`` in the unscaled table."""
        return max(round(repeats * self.depth), 1) if repeats > 1 else repeats


SCALES: dict[str, YOLO11Config] = {
    "n": YOLO11Config(depth=0.50, width=0.25),
    "s": YOLO11Config(depth=0.50, width=0.50),
    "m": YOLO11Config(depth=0.50, width=1.00, max_channels=512, force_c3k=True),
    "l": YOLO11Config(depth=1.00, width=1.00, max_channels=512, force_c3k=True),
    "x": YOLO11Config(depth=1.00, width=1.50, max_channels=512, force_c3k=True),
}


def yolo11_backbone(cfg: YOLO11Config) -> tuple[list[Layer], list[int]]:
    """Layers 0-10 and the output channels of each; P3 = layer 4, P4 = layer 6, P5 = layer 10."""
    c3k = cfg.force_c3k
    specs: list[tuple[int, nn.Module]] = []
    ch = [3]

    def add(module: nn.Module, c_out: int) -> None:
        specs.append((-1, module))
        ch.append(c_out)

    add(Conv(3, cfg.ch(64), 3, 2), cfg.ch(64))  # 0  P1/2
    add(Conv(ch[-1], cfg.ch(128), 3, 2), cfg.ch(128))  # 1  P2/4
    add(C3k2(ch[-1], cfg.ch(256), cfg.n(2), c3k, e=0.25), cfg.ch(256))  # 2
    add(Conv(ch[-1], cfg.ch(256), 3, 2), cfg.ch(256))  # 3  P3/8
    add(C3k2(ch[-1], cfg.ch(512), cfg.n(2), c3k, e=0.25), cfg.ch(512))  # 4
    add(Conv(ch[-1], cfg.ch(512), 3, 2), cfg.ch(512))  # 5  P4/16
    add(C3k2(ch[-1], cfg.ch(512), cfg.n(2), True), cfg.ch(512))  # 6
    add(Conv(ch[-1], cfg.ch(1024), 3, 2), cfg.ch(1024))  # 7  P5/32
    add(C3k2(ch[-1], cfg.ch(1024), cfg.n(2), True), cfg.ch(1024))  # 8
    add(SPPF(ch[-1], cfg.ch(1024), 5), cfg.ch(1024))  # 9
    add(C2PSA(ch[-1], cfg.ch(1024), cfg.n(2)), cfg.ch(1024))  # 10
    return list(specs), ch[1:]
