"""Optimiser parameter groups, the `auto` optimiser rule, warm-up and the per-epoch LR schedule.

Recipe: docs/models.md, design note D4 (Ultralytics YOLO11 defaults). The schedule is a pure function of
(iteration, epoch), so a resumed run needs no scheduler state to continue exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["LRSchedule", "OptimizerChoice", "build_optimizer", "choose_optimizer", "param_groups"]

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


@dataclass(frozen=True)
class OptimizerChoice:
    """What `auto` resolved to (or the explicit choice), recorded in the run's resolved config."""

    name: str  # "SGD" or "AdamW"
    lr0: float
    momentum: float
    warmup_bias_lr: float


def choose_optimizer(
    name: str, *, lr0: float, momentum: float, warmup_bias_lr: float, nc: int, iterations: int
) -> OptimizerChoice:
    """Resolve `auto`: SGD(lr 0.01, momentum 0.9) above 10,000 iterations, else AdamW(lr round(0.002*5/(4+nc), 6)).

    Args:
        iterations: ceil(N_train / max(batch, 64)) * epochs, as in Ultralytics.
    """
    if name == "auto":
        if iterations > 10_000:
            return OptimizerChoice("SGD", 0.01, 0.9, warmup_bias_lr)
        return OptimizerChoice("AdamW", round(0.002 * 5 / (4 + nc), 6), 0.9, 0.0)
    if name not in ("SGD", "AdamW"):
        raise ValueError(f"optimizer: expected SGD, AdamW or auto, got {name!r}")
    return OptimizerChoice(name, lr0, momentum, warmup_bias_lr)


def param_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """Split trainable parameters into (biases, norm weights and other 0/1-d tensors, weights with decay)."""
    biases: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    decay: list[nn.Parameter] = []
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if pname == "bias":
                biases.append(p)
            elif isinstance(module, _NORMS) or p.ndim <= 1:
                no_decay.append(p)
            else:
                decay.append(p)
    return biases, no_decay, decay


def build_optimizer(model: nn.Module, choice: OptimizerChoice, *, weight_decay: float) -> torch.optim.Optimizer:
    """Optimiser with three groups: 0 biases (no decay), 1 norm weights (no decay), 2 weights (`weight_decay`)."""
    biases, no_decay, decay = param_groups(model)
    if choice.name == "SGD":
        opt: torch.optim.Optimizer = torch.optim.SGD(biases, lr=choice.lr0, momentum=choice.momentum, nesterov=True)
    else:
        opt = torch.optim.AdamW(biases, lr=choice.lr0, betas=(choice.momentum, 0.999), weight_decay=0.0)
    opt.add_param_group({"params": no_decay, "weight_decay": 0.0})
    opt.add_param_group({"params": decay, "weight_decay": weight_decay})
    for group in opt.param_groups:
        group["initial_lr"] = choice.lr0
    return opt


@dataclass(frozen=True)
class LRSchedule:
    """Warm-up then a per-epoch linear (or cosine) decay to lr0 * lrf.

    Warm-up lasts max(round(warmup_epochs * batches_per_epoch), 100) iterations: the bias group's lr goes from
    `warmup_bias_lr` and the others' from 0 to lr0 * f(epoch); SGD momentum goes from `warmup_momentum` to `momentum`;
    gradient accumulation ramps from 1 to nbs / batch.
    """

    lr0: float
    lrf: float
    epochs: int
    batches_per_epoch: int
    warmup_epochs: float = 3.0
    warmup_bias_lr: float = 0.1
    warmup_momentum: float = 0.8
    momentum: float = 0.937
    cos_lr: bool = False
    accumulate: int = 4  # max(round(nbs / batch), 1)

    @property
    def warmup_iters(self) -> int:
        if self.warmup_epochs <= 0:
            return 0
        return max(round(self.warmup_epochs * self.batches_per_epoch), 100)

    def factor(self, epoch: int) -> float:
        """f(e): linear (1 - e/E)(1 - lrf) + lrf, or cosine ((1 - cos(pi e / E)) / 2)(lrf - 1) + 1."""
        if self.cos_lr:
            return ((1 - math.cos(epoch * math.pi / self.epochs)) / 2) * (self.lrf - 1) + 1
        return max(1 - epoch / self.epochs, 0) * (1.0 - self.lrf) + self.lrf

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int, epoch: int) -> int:
        """Set every group's lr (and SGD momentum) for global `iteration`; return the accumulation count to use."""
        target = self.lr0 * self.factor(epoch)
        nw = self.warmup_iters
        if iteration > nw or nw == 0:
            for group in optimizer.param_groups:
                group["lr"] = target
                if "momentum" in group:
                    group["momentum"] = self.momentum
            return self.accumulate
        xi = [0, nw]
        for j, group in enumerate(optimizer.param_groups):
            group["lr"] = float(np.interp(iteration, xi, [self.warmup_bias_lr if j == 0 else 0.0, target]))
            if "momentum" in group:
                group["momentum"] = float(np.interp(iteration, xi, [self.warmup_momentum, self.momentum]))
        return max(1, int(np.interp(iteration, xi, [1, self.accumulate]).round()))

    def state_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}
