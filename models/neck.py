"""YOLO11 PAN-FPN neck: two top-down upsampling merges, two bottom-up stride-2 merges, three output levels.

Shared by YOLO11 (C3k2 blocks, nearest upsampling), YOLO11-DySample (DySample upsamplers) and GMS2-YOLO (MANet_Star
blocks on a GHGNet backbone): the caller passes the block and upsampler factories. Layer order as in ``yolo11.yaml``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from models.backbone import Layer, YOLO11Config
from models.blocks import C3k2, Concat, Conv

__all__ = ["BlockFactory", "UpsampleFactory", "c3k2_block", "nearest_upsample", "pan_fpn"]

# (c_in, c_out, stage) -> block; stage 0..3 = the four neck blocks in graph order (P4 top-down, P3 out, P4 out, P5 out).
BlockFactory = Callable[[int, int, int], nn.Module]
# channels -> 2x upsampler
UpsampleFactory = Callable[[int], nn.Module]


def nearest_upsample(channels: int) -> nn.Module:
    """YOLO11's parameter-free 2x nearest upsampling (``channels`` unused)."""
    del channels
    return nn.Upsample(scale_factor=2.0, mode="nearest")


def c3k2_block(cfg: YOLO11Config) -> BlockFactory:
    """YOLO11 neck blocks: C3k2 with two repeats before scaling; only the P5 output block uses C3k inside."""

    def make(c1: int, c2: int, stage: int) -> nn.Module:
        return C3k2(c1, c2, cfg.n(2), cfg.force_c3k or stage == 3)

    return make


def pan_fpn(
    cfg: YOLO11Config,
    ch: list[int],
    skips: tuple[int, int, int],
    make_block: BlockFactory,
    make_upsample: UpsampleFactory = nearest_upsample,
) -> tuple[list[Layer], tuple[int, int, int]]:
    """Neck layers appended after the backbone.

    Args:
        cfg: width/depth scaling.
        ch: output channels of every layer so far (extended in place with the neck's layers).
        skips: backbone layer indices of the P3, P4 and P5 features (P5 = the last backbone layer).
        make_block: builds the four CSP-style blocks.
        make_upsample: builds the two 2x upsamplers.

    Returns:
        The 12 neck layers and the layer indices of the P3, P4, P5 outputs.
    """
    p3, p4, p5 = skips
    first = len(ch)
    layers: list[Layer] = []

    def add(src: int | tuple[int, ...], module: nn.Module, c_out: int) -> None:
        layers.append((src, module))
        ch.append(c_out)

    add(-1, make_upsample(ch[-1]), ch[-1])  # +0
    add((-1, p4), Concat(1), ch[-1] + ch[p4])  # +1
    add(-1, make_block(ch[-1], cfg.ch(512), 0), cfg.ch(512))  # +2
    add(-1, make_upsample(ch[-1]), ch[-1])  # +3
    add((-1, p3), Concat(1), ch[-1] + ch[p3])  # +4
    add(-1, make_block(ch[-1], cfg.ch(256), 1), cfg.ch(256))  # +5  P3 out
    add(-1, Conv(ch[-1], cfg.ch(256), 3, 2), cfg.ch(256))  # +6
    add((-1, first + 2), Concat(1), ch[-1] + ch[first + 2])  # +7
    add(-1, make_block(ch[-1], cfg.ch(512), 2), cfg.ch(512))  # +8  P4 out
    add(-1, Conv(ch[-1], cfg.ch(512), 3, 2), cfg.ch(512))  # +9
    add((-1, p5), Concat(1), ch[-1] + ch[p5])  # +10
    add(-1, make_block(ch[-1], cfg.ch(1024), 3), cfg.ch(1024))  # +11 P5 out
    return layers, (first + 5, first + 8, first + 11)
