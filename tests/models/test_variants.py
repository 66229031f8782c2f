"""Contract tests over every variant (timm-style): parameter counts, shapes, channels, gradients, output types."""

from __future__ import annotations

import pytest
import torch

import models
from tests.models.conftest import ALL_VARIANTS, LARGE_VARIANTS, SMALL_VARIANTS, level_channels

# Exact totals from docs/models.md, design notes D2.1, D6.2 and D7 (verified against Ultralytics' published YOLO11
# counts); YOLO11 m/l/x and YOLOv8 at nc=80 checked against Ultralytics 8.4's own builds (docs/byom.md), nc=6
# counted by our builders.
PARAMS_NC6 = {
    "yolo11n": 2_591_010,
    "yolo11s": 9_430_114,
    "yolo11m": 20_057_634,
    "yolo11l": 25_315_106,
    "yolo11x": 56_880_706,
    "yolov8n": 3_012_018,
    "yolov8s": 11_137_922,
    "yolov8m": 25_859_794,
    "yolov8l": 43_634_466,
    "yolov8x": 68_158_386,
    "grace-n": 2_593_843,
    "grace-s": 9_439_875,
    "dysample-n": 2_603_362,
    "dysample-s": 9_454_754,
    "gms2-n": 3_496_865,
    "gms2-s": 13_814_249,
}
PARAMS_NC80 = {
    "yolo11n": 2_624_080,
    "yolo11s": 9_458_752,
    "yolo11m": 20_114_688,
    "yolo11l": 25_372_160,
    "yolo11x": 56_966_176,
    "yolov8n": 3_157_200,
    "yolov8s": 11_166_560,
    "yolov8m": 25_902_640,
    "yolov8l": 43_691_520,
    "yolov8x": 68_229_648,
    "grace-s": 9_468_513,
    "dysample-n": 2_636_432,
    "dysample-s": 9_483_392,
    "gms2-n": 3_501_675,
}


def test_variant_table_is_the_contract() -> None:
    assert set(models.VARIANTS) == set(PARAMS_NC6)


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_param_count_nc6(name: str, built) -> None:
    model = built(name)
    assert models.count_parameters(model) == PARAMS_NC6[name]
    # the DFL bins are the only frozen parameters
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == 16


@pytest.mark.parametrize("name", list(PARAMS_NC80))
def test_param_count_nc80(name: str) -> None:
    assert models.count_parameters(models.create_model(name, nc=80)) == PARAMS_NC80[name]


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_attributes(name: str, built) -> None:
    model = built(name)
    assert model.variant == name
    assert model.nc == 6 and model.reg_max == 16
    assert model.stride.dtype == torch.float32
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    assert model.default_box_loss == ("wiou3" if name.startswith("gms2") else "ciou")
    assert "stride" not in model.state_dict()


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_shapes_and_channels(name: str, built) -> None:
    model = built(name)
    side = 64 if name in LARGE_VARIANTS else 320
    seen: list[list[int]] = []
    handle = model.head.register_forward_pre_hook(lambda m, args: seen.append([f.shape[1] for f in args[0]]))
    with torch.no_grad():
        feats = model(torch.rand(2, 3, side, side))
    handle.remove()
    assert seen == [list(level_channels(name))]
    assert [tuple(f.shape) for f in feats] == [(2, 64 + 6, side // s, side // s) for s in (8, 16, 32)]
    out = model.decode(feats)
    assert out.shape == (2, 4 + 6, sum((side // s) ** 2 for s in (8, 16, 32)))
    assert out[:, 4:].min() >= 0 and out[:, 4:].max() <= 1


def _check_640(name: str, built) -> None:
    model = built(name)
    with torch.no_grad():
        out = models.InferenceModel(model)(torch.rand(1, 3, 640, 640))
    assert out.shape == (1, 10, 8400)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", SMALL_VARIANTS)
def test_shape_640(name: str, built) -> None:
    _check_640(name, built)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ALL_VARIANTS if n not in SMALL_VARIANTS + LARGE_VARIANTS])
def test_shape_640_s(name: str, built) -> None:
    _check_640(name, built)


def test_non_square_input(built) -> None:
    model = built("yolo11n")
    with torch.no_grad():
        out = model.decode(model(torch.rand(1, 3, 256, 160)))
    assert out.shape == (1, 10, 32 * 20 + 16 * 10 + 8 * 5)


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_gradients_reach_every_parameter(name: str, built) -> None:
    model = built(name).train()
    feats = model(torch.rand(2, 3, 64, 64))
    sum(f.float().square().mean() for f in feats).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_train_and_eval_return_the_same_types(name: str, built) -> None:
    model = built(name)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out_eval = model.eval()(x)
        out_train = model.train()(x)
    assert type(out_eval) is type(out_train) is list
    assert [f.shape for f in out_eval] == [f.shape for f in out_train]


def test_yolo11_state_dict_keys_match_yolo11_layout(built) -> None:
    keys = built("yolo11n").state_dict().keys()
    for key in (
        "model.0.conv.weight",
        "model.0.bn.running_mean",
        "model.2.m.0.cv1.conv.weight",
        "model.6.m.0.m.1.cv2.bn.bias",
        "model.10.m.0.attn.qkv.conv.weight",
        "model.10.m.0.ffn.1.bn.weight",
        "model.23.cv2.2.2.bias",
        "model.23.cv3.1.0.0.conv.weight",
        "model.23.dfl.conv.weight",
    ):
        assert key in keys
    assert len(keys) == 499
    assert sum(k.endswith("num_batches_tracked") for k in keys) == 81


def test_grace_layout_and_buffer(built) -> None:
    keys = built("grace-s").state_dict().keys()
    assert "model.23.s_e" in keys and "model.23.ca.1.weight" in keys
    assert "model.24.cv3.1.0.0.conv.weight" in keys


def test_batchnorm_hyperparameters_and_bias_init(built) -> None:
    model = built("yolo11n")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 and m.momentum == 0.03 for m in bns)
    head = model.head
    cls_bias = [seq[-1].bias[0].item() for seq in head.cv3]
    assert cls_bias == pytest.approx([-8.9464, -7.5601, -6.1738], abs=1e-3)
    assert all(seq[-1].bias.eq(1.0).all() for seq in head.cv2)


def test_unknown_variant_and_bad_nc() -> None:
    with pytest.raises(KeyError, match="yolo11n"):
        models.create_model("yolo12n")
    with pytest.raises(ValueError, match="nc"):
        models.create_model("yolo11n", nc=0)


def test_model_kwargs_recorded() -> None:
    model = models.create_model("dysample-n", nc=3, dyscope=True)
    assert model.model_kwargs == {"dyscope": True}
    # dynamic scope adds 32 * C per DySample (C = 256 and 128 at n scale)
    assert models.count_parameters(model) == models.count_parameters(models.create_model("dysample-n", nc=3)) + 32 * (
        256 + 128
    )
