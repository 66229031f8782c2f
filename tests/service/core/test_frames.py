"""service/core/frames.py: admission from headers (tile and pixel limits before decoding), decode, batch rows and
merge."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from service.core.bundle import InputSpec, PostprocessSpec
from service.core.errors import ImageError, ImageTooLarge, TooManyTiles
from service.core.frames import (
    FrameLimits,
    TileInput,
    TilingMode,
    TilingPolicy,
    admit_frames,
    assemble_rows,
    decode_planned,
    merge_plan,
    plan_frame,
)
from service.core.postprocess import Detections, postprocess
from service.core.preprocess import decode_frame, fill_input
from service.http.errors import status_of
from tests.synthetic import encode_image, make_image_bytes

SPEC = InputSpec(width=64, height=64)
PP = PostprocessSpec(score_thresholds={"scratch": 0.5, "dent": 0.5})


def _policy(mode: TilingMode = "on", tile: int = 64, max_detections: int = 5000) -> TilingPolicy:
    return TilingPolicy(
        mode,
        tile,
        tile,
        0.25,
        False,
        0.5,
        input_width=64,
        input_height=64,
        source="test",
        max_detections=max_detections,
    )


def _header_then_garbage(width: int, height: int) -> bytes:
    """A valid PNG header stating ``width`` x ``height`` (as ``_png_header`` in test_preprocess.py), then bytes that
    are no image data at all: anything that decodes it fails."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    head = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\0\0\0\0"
    return head + b"\x13\x37 this is not zlib data " * 8 + b"IEND"


def test_garbage_after_the_header_does_not_decode() -> None:
    with pytest.raises(ImageError):
        decode_frame(_header_then_garbage(1000, 1000), max_pixels=10**8)


def test_one_frame_over_the_frame_limit() -> None:
    policy = _policy()
    need = plan_frame(1000, 1000, policy).inputs
    assert need == 21 * 21  # 1000 px in 64 px tiles sharing >= 16 px: ceil(984 / 48) = 21 per side
    data = _header_then_garbage(1000, 1000)
    with pytest.raises(TooManyTiles, match=r"needs 441 tiles.*setting tiling\.max_tiles_per_frame") as err:
        admit_frames([data], policy, FrameLimits(max_tiles_per_frame=need - 1))
    assert status_of(err.value) == 413 and err.value.code == "too_many_tiles"
    plans = admit_frames([data], policy, FrameLimits(max_tiles_per_frame=need))  # at the limit: admitted
    assert plans == [plan_frame(1000, 1000, policy)]


def test_request_over_the_request_limit() -> None:
    policy = _policy()
    per_frame = plan_frame(300, 300, policy).inputs
    datas = [_header_then_garbage(300, 300)] * 3
    with pytest.raises(TooManyTiles, match=r"3 images need 108 tiles.*setting tiling\.max_tiles_per_request"):
        admit_frames(datas, policy, FrameLimits(max_tiles_per_frame=per_frame, max_tiles_per_request=3 * per_frame - 1))
    assert per_frame == 36
    assert len(admit_frames(datas, policy, FrameLimits(max_tiles_per_request=3 * per_frame))) == 3


def test_frame_limit_names_the_frame() -> None:
    datas = [_header_then_garbage(100, 100), _header_then_garbage(1000, 1000)]
    with pytest.raises(TooManyTiles, match=r"^b\.png: 1000x1000"):
        admit_frames(datas, _policy(), FrameLimits(max_tiles_per_frame=100), labels=["a.png", "b.png"])


def test_too_many_pixels_from_the_header() -> None:
    data = _header_then_garbage(100_000, 100_000)
    with pytest.raises(ImageTooLarge, match=r"100000x100000 = 10000000000 pixels.*setting max_image_pixels"):
        admit_frames([data], _policy(), FrameLimits())
    small = _header_then_garbage(2000, 1000)
    with pytest.raises(ImageTooLarge, match="over the limit of 1999999"):
        admit_frames([small], _policy("off"), FrameLimits(max_pixels=2000 * 1000 - 1))


def test_untiled_frames_count_one_input_each() -> None:
    plans = admit_frames([_header_then_garbage(5000, 5000)] * 4, _policy("off"), FrameLimits(max_tiles_per_request=4))
    assert [p.inputs if p else None for p in plans] == [1, 1, 1, 1]


def test_header_without_a_size_is_planned_after_decoding() -> None:
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 0)  # a TIFF whose directory states no size
    plans = admit_frames([tiff, _header_then_garbage(100, 100)], _policy(), FrameLimits(max_tiles_per_request=4))
    assert plans[0] is None and plans[1] is not None and plans[1].inputs == 4  # not counted: 4 of 4 admitted


def test_decode_planned_reduces_only_frames_letterboxed_whole() -> None:
    data = make_image_bytes(1600, 1200, "jpeg")
    limits = FrameLimits()
    whole_policy = _policy("off")
    whole = decode_planned(data, plan_frame(1600, 1200, whole_policy), whole_policy, limits, SPEC)
    assert whole.frame.pixels.shape[:2] == (150, 200) and whole.plan.windows == ((0, 0, 1600, 1200),)
    tiled_policy = _policy("on", 400)
    tiled = decode_planned(data, plan_frame(1600, 1200, tiled_policy), tiled_policy, limits, SPEC)
    assert tiled.frame.pixels.shape[:2] == (1200, 1600)
    assert len(tiled.infos) == tiled.plan.inputs == 5 * 4
    assert [t.window for t in tiled.inputs()] == list(tiled.plan.windows)
    assert all(t.frame is tiled.frame for t in tiled.inputs())


def test_assemble_rows_is_fill_input_per_row() -> None:
    frame = decode_frame(make_image_bytes(300, 200, "png"), max_pixels=10**6)
    windows = [(0, 0, 300, 200), (10, 20, 74, 84), (200, 100, 300, 200)]
    batch = np.zeros((4, 3, 64, 64), np.float32)
    assemble_rows(SPEC)([TileInput(frame, w) for w in windows], batch[:3])
    for row, w in zip(batch, windows, strict=False):
        expected = np.zeros((3, 64, 64), np.float32)
        fill_input(expected, frame, w, SPEC)
        assert np.array_equal(row, expected)
    assert not batch[3].any()


def test_merge_plan_uses_the_policy_and_the_caps() -> None:
    policy = _policy("on", 100)
    plan = plan_frame(150, 100, policy)
    assert plan.windows == ((0, 0, 100, 100), (50, 0, 150, 100))
    one = np.zeros(1, np.int64)
    parts = [
        Detections(np.array([[30, 20, 100, 60]], np.float32), np.array([0.6], np.float32), one),
        Detections(np.array([[50, 20, 120, 60]], np.float32), np.array([0.8], np.float32), one),
    ]
    out = merge_plan(parts, plan, policy, PP)
    assert out.boxes_xyxy.tolist() == [[30.0, 20.0, 120.0, 60.0]]
    strict = TilingPolicy("on", 100, 100, 0.25, False, 1.0, input_width=64, input_height=64, source="test")
    assert len(merge_plan(parts, plan, strict, PP)) == 2  # IoU 1.0 in the shared region is not > 1.0


def test_tile_detections_come_back_in_frame_pixels() -> None:
    # The service's path for one defect: decode, plan, letterbox each tile, postprocess each tile's raw output with
    # that tile's LetterboxInfo, merge. merge_frame documents its parts as "already in frame pixels".
    pixels = np.zeros((400, 1000), np.uint8)
    true = (700.0, 100.0, 740.0, 140.0)
    pixels[100:140, 700:740] = 255
    data = encode_image(pixels, "png")
    policy = _policy("on", 200)
    plan = admit_frames([data], policy, FrameLimits())[0]
    decoded = decode_planned(data, plan, policy, FrameLimits(), SPEC)
    parts = []
    for (x0, y0, x1, y1), info in zip(decoded.plan.windows, decoded.infos, strict=True):
        bx0, by0, bx1, by1 = max(true[0], x0), max(true[1], y0), min(true[2], x1), min(true[3], y1)
        raw = np.zeros((1, 6, 1), np.float32)  # one anchor: cx, cy, w, h in model-input pixels, two class scores
        if bx1 - bx0 >= 1 and by1 - by0 >= 1:  # the model sees the part of the defect inside this tile
            u0, v0 = (bx0 - info.offset_x) * info.scale + info.pad_x, (by0 - info.offset_y) * info.scale + info.pad_y
            u1, v1 = (bx1 - info.offset_x) * info.scale + info.pad_x, (by1 - info.offset_y) * info.scale + info.pad_y
            raw[0, :, 0] = [(u0 + u1) / 2, (v0 + v1) / 2, u1 - u0, v1 - v0, 0.9, 0.0]
        parts.append(postprocess(raw, [info], [0.5, 0.5])[0])
    out = merge_plan(parts, decoded.plan, policy, PP)
    # float32 round trip through the input scale (64 / 200): a fraction of a frame pixel
    assert len(out) == 1, out.boxes_xyxy.tolist()
    np.testing.assert_allclose(
        out.boxes_xyxy[0], true, atol=0.01, err_msg="tile boxes must reach merge_frame in frame pixels (window offset)"
    )


def test_tiled_frames_have_their_own_detection_cap() -> None:
    """A 5 MP frame holds far more defects than one image: tiled frames are capped by the policy, not the bundle."""
    pp = PostprocessSpec(score_thresholds={}, max_detections=2)
    boxes = np.array([[10.0 * i, 0, 10.0 * i + 5, 5] for i in range(5)], np.float32)  # apart: nothing merges
    parts = [Detections(boxes, np.linspace(0.9, 0.5, 5).astype(np.float32), np.zeros(5, np.int64))]
    parts.append(Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)))
    tiled = plan_frame(150, 100, _policy("on", 100, max_detections=4))
    assert tiled.tiled and len(merge_plan(parts, tiled, _policy("on", 100, max_detections=4), pp)) == 4
    whole = plan_frame(150, 100, _policy("off", 100))
    assert not whole.tiled and len(merge_plan(parts[:1], whole, _policy("off", 100), pp)) == 2
