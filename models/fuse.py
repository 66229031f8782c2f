"""Conv+BN folding for inference: ``fuse_model`` folds every BatchNorm into the convolution before it.

A module takes part by defining ``fuse() -> None`` (``blocks.Conv``, the separated-BN head of GMS2-YOLO); this file
only holds the arithmetic and the walk over the model, so it imports nothing else from ``models``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["fold_conv_bn", "fuse_model"]


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Return a new biased Conv2d equal to ``bn(conv(x))`` in eval mode (running statistics).

    w' = w * g / sqrt(var + eps);  b' = (b - mean) * g / sqrt(var + eps) + beta.
    """
    assert bn.running_mean is not None and bn.running_var is not None, "BatchNorm without running stats"
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        conv.stride,  # type: ignore[arg-type]
        conv.padding,  # type: ignore[arg-type]
        conv.dilation,  # type: ignore[arg-type]
        conv.groups,
        bias=True,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    gain = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
    fused.weight.copy_(conv.weight * gain.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    assert fused.bias is not None  # built with bias=True
    fused.bias.copy_((bias - bn.running_mean) * gain + bn.bias)
    fused.requires_grad_(False)
    return fused


def fuse_model(model: nn.Module) -> nn.Module:
    """Fold Conv+BN in place for inference and return the model (switched to eval mode).

    Every submodule that defines ``fuse()`` is fused once; the output stays equal to the unfused eval-mode output
    within float rounding (tested at 1e-4). A fused model cannot be trained further (no BatchNorm left).
    """
    model.eval()
    fusable = [fuse for m in model.modules() if m is not model and callable(fuse := getattr(m, "fuse", None))]
    for fuse in fusable:
        fuse()
    if hasattr(model, "fused"):
        model.fused = True  # type: ignore[assignment]  # torch types Module attributes as Tensor | Module
    return model
