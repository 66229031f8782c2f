"""Fixtures for the model-zoo tests: one cached eval-mode build per variant, and the published widths."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

import models
from models import Detector

ALL_VARIANTS = list(models.VARIANTS)
SMALL_VARIANTS = [name for name in ALL_VARIANTS if name[-1] == "n"]
# m/l/x scales (20-68 M parameters): forward passes at tiny inputs only, so the contract tests stay fast on CPU
LARGE_VARIANTS = [name for name in ALL_VARIANTS if name[-1] in "mlx"]

# Channels of the P3/P4/P5 maps that enter the head (docs/models.md, design notes D2 and D6.2; YOLOv8 and YOLO11
# m/l/x: docs/byom.md).
_SCALE_CHANNELS = {"n": (64, 128, 256), "s": (128, 256, 512)}
_LARGE_CHANNELS = {
    "yolo11m": (256, 512, 512),
    "yolo11l": (256, 512, 512),
    "yolo11x": (384, 768, 768),
    "yolov8m": (192, 384, 576),
    "yolov8l": (256, 512, 512),
    "yolov8x": (320, 640, 640),
}


def level_channels(name: str) -> tuple[int, int, int]:
    return _LARGE_CHANNELS.get(name) or _SCALE_CHANNELS[scale_of(name)]


def scale_of(name: str) -> str:
    return name[-1]


@pytest.fixture(scope="session")
def built() -> Callable[[str], Detector]:
    """Return a fresh copy of variant ``name`` (nc=6, seeded, eval mode); builds each variant once per session."""
    cache: dict[str, Detector] = {}

    def get(name: str) -> Detector:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = models.create_model(name, nc=6).eval()
        return copy.deepcopy(cache[name])

    return get


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial statistics and affine weights so that fusing is actually exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) * 0.2 - 0.1)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Run these tests single-threaded: on a shared 2-core runner, torch's thread pool oversubscribes the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
