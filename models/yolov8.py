"""YOLOv8 detection models n/s/m/l/x: C2f backbone and PAN-FPN, SPPF, the head with a plain class branch.

YOLOv8 (Jocher, Chaurasia & Qiu, Ultralytics 2023), layer table restated from ``yolov8.yaml`` in docs/byom.md; our
own code. Layer indices match Ultralytics' (Detect at layer 22), so imported YOLOv8 weights load by key.
"""

from __future__ import annotations

from torch import nn

from models.backbone import Layer, YOLO11Config
from models.blocks import SPPF, C2f, Conv
from models.head import Detect
from models.neck import pan_fpn
from models.yolo11 import Detector

__all__ = ["YOLOV8_SCALES", "yolov8", "yolov8l", "yolov8m", "yolov8n", "yolov8s", "yolov8x"]

# [depth, width, max_channels] per scale (yolov8.yaml).
YOLOV8_SCALES: dict[str, YOLO11Config] = {
    "n": YOLO11Config(depth=0.33, width=0.25, max_channels=1024),
    "s": YOLO11Config(depth=0.33, width=0.50, max_channels=1024),
    "m": YOLO11Config(depth=0.67, width=0.75, max_channels=768),
    "l": YOLO11Config(depth=1.00, width=1.00, max_channels=512),
    "x": YOLO11Config(depth=1.00, width=1.25, max_channels=512),
}


def _backbone(cfg: YOLO11Config) -> tuple[list[Layer], list[int]]:
    """Layers 0-9 and their output channels; P3 = layer 4, P4 = layer 6, P5 = layer 9 (SPPF)."""
    table: list[tuple[str, int, int]] = [  # (block, unscaled channels, unscaled repeats)
        ("conv", 64, 1),  # 0 P1/2
        ("conv", 128, 1),  # 1 P2/4
        ("c2f", 128, 3),  # 2
        ("conv", 256, 1),  # 3 P3/8
        ("c2f", 256, 6),  # 4
        ("conv", 512, 1),  # 5 P4/16
        ("c2f", 512, 6),  # 6
        ("conv", 1024, 1),  # 7 P5/32
        ("c2f", 1024, 3),  # 8
        ("sppf", 1024, 1),  # 9
    ]
    layers: list[Layer] = []
    ch = [3]
    for kind, c, repeats in table:
        c_out = cfg.ch(c)
        if kind == "conv":
            module: nn.Module = Conv(ch[-1], c_out, 3, 2)
        elif kind == "c2f":
            module = C2f(ch[-1], c_out, cfg.n(repeats), shortcut=True)
        else:
            module = SPPF(ch[-1], c_out, 5)
        layers.append((-1, module))
        ch.append(c_out)
    return layers, ch[1:]


def yolov8(scale: str, nc: int, variant: str) -> Detector:
    """YOLOv8 at ``scale`` (n, s, m, l or x): layers 0-21 + the YOLOv8 ``Detect`` head at layer 22."""
    cfg = YOLOV8_SCALES[scale]
    layers, ch = _backbone(cfg)
    # the neck's four blocks: C2f without shortcut, three repeats before scaling, the same at every position
    neck, outs = pan_fpn(cfg, ch, (4, 6, 9), lambda c1, c2, stage: C2f(c1, c2, cfg.n(3), shortcut=False))
    layers += neck
    layers.append((outs, Detect(nc, [ch[i] for i in outs], depthwise_cls=False)))
    return Detector(layers, variant=variant, nc=nc)


def yolov8n(nc: int = 6) -> Detector:
    """YOLOv8n: 3,157,200 parameters at nc=80."""
    return yolov8("n", nc, "yolov8n")


def yolov8s(nc: int = 6) -> Detector:
    """YOLOv8s: 11,166,560 parameters at nc=80."""
    return yolov8("s", nc, "yolov8s")


def yolov8m(nc: int = 6) -> Detector:
    """YOLOv8m: 25,902,640 parameters at nc=80."""
    return yolov8("m", nc, "yolov8m")


def yolov8l(nc: int = 6) -> Detector:
    """YOLOv8l: 43,691,520 parameters at nc=80."""
    return yolov8("l", nc, "yolov8l")


def yolov8x(nc: int = 6) -> Detector:
    """YOLOv8x: 68,229,648 parameters at nc=80."""
    return yolov8("x", nc, "yolov8x")
