"""Model exponential moving average (the copy that is validated and saved), as in YOLOv5/v8.

Decay and update rule: docs/models.md, design note D4.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["ModelEMA"]


class ModelEMA:
    """EMA of every floating-point entry of a model's state_dict (parameters and BatchNorm buffers).

    decay(u) = decay * (1 - exp(-u / tau)) after u updates, so early updates follow the model closely and the average
    lengthens as training settles. The EMA copy stays in eval mode and never receives gradients.
    """

    def __init__(self, model: nn.Module, *, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0) -> None:
        self.model = copy.deepcopy(_unwrap(model)).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    def current_decay(self) -> float:
        return self.decay * (1.0 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of `model` (DDP-wrapped or not) into the average."""
        self.updates += 1
        d = self.current_decay()
        source = _unwrap(model).state_dict()
        for name, value in self.model.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(source[name].detach(), alpha=1.0 - d)
            else:
                value.copy_(source[name])

    def state_dict(self) -> dict[str, object]:
        """Counters only; the averaged weights are saved as the checkpoint's `state_dict`."""
        return {"updates": self.updates, "decay": self.decay, "tau": self.tau}

    def load_state_dict(self, state: dict[str, object], weights: dict[str, torch.Tensor]) -> None:
        self.updates = int(state["updates"])  # type: ignore[call-overload]
        self.model.load_state_dict(weights)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
