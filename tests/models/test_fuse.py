"""Conv+BN fusion: same outputs in eval mode, no BatchNorm left, expected fused parameter counts."""

from __future__ import annotations

import pytest
import torch

import models
from tests.models.conftest import ALL_VARIANTS, randomize_batchnorm


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_fused_equals_unfused(name: str, built) -> None:
    model = built(name)
    randomize_batchnorm(model)
    if name.startswith("grace"):
        model.set_epoch(29)
    x = torch.rand(2, 3, 96, 64)
    with torch.no_grad():
        raw = model(x)
        boxes = model.decode(raw)
        fused = models.fuse_model(model)
        raw_f = fused(x)
        boxes_f = fused.decode(raw_f)
    assert fused is model and fused.fused
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    for a, b in zip(raw, raw_f, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(boxes_f, boxes, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("name", "fused_params"), [("yolo11n", 2_583_322), ("yolo11s", 9_415_122)])
def test_fused_param_count(name: str, fused_params: int, built) -> None:
    assert models.count_parameters(models.fuse_model(built(name))) == fused_params


def test_fusing_twice_is_harmless(built) -> None:
    model = models.fuse_model(built("gms2-n"))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        models.fuse_model(model)
        after = model(x)
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b)
