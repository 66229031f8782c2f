"""FLOP counting with forward hooks (no thop): Conv2d, Linear and the attention matmuls (``blocks.MatMul``).

GFLOPs follow the Ultralytics convention: 2 x multiply-accumulates of those layers for one image; BatchNorm,
activations, pooling, resampling and element-wise ops are not counted (they are <1 % of the total here).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.blocks import MatMul

__all__ = ["count_flops"]


def _conv_macs(module: nn.Conv2d, output: torch.Tensor) -> int:
    kh, kw = module.kernel_size
    return output.numel() * (module.in_channels // module.groups) * kh * kw


def _linear_macs(module: nn.Linear, output: torch.Tensor) -> int:
    return output.numel() * module.in_features


def _matmul_macs(a: torch.Tensor, output: torch.Tensor) -> int:
    return output.numel() * a.shape[-1]  # (..., n, k) @ (..., k, m) -> (..., n, m)


@torch.no_grad()
def count_flops(model: nn.Module, imgsz: int | tuple[int, int] = 640) -> float:
    """GFLOPs of one forward pass of ``model`` on a single ``imgsz`` image (eval mode, state restored after)."""
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    total = [0]

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            total[0] += _conv_macs(module, output)
        elif isinstance(module, nn.Linear):
            total[0] += _linear_macs(module, output)
        else:
            total[0] += _matmul_macs(inputs[0], output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear | MatMul)]
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        model(torch.zeros(1, 3, h, w, dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return 2 * total[0] / 1e9
