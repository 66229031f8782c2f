"""The plan in service/core/frames.py: tile starts along an axis, frame plans (coverage, sizes, modes), policies."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest

from service.core.bundle import InputSpec, ModelBundle, TilingSpec
from service.core.frames import (
    AUTO_MARGIN,
    TilingMode,
    TilingPolicy,
    TilingSettings,
    axis_starts,
    plan_frame,
    resolve_policy,
)


def _policy(
    mode: TilingMode = "auto", tile: tuple[int, int] | None = (200, 200), overlap: float = 0.25, full: bool = False
) -> TilingPolicy:
    tw, th = tile if tile is not None else (None, None)
    return TilingPolicy(mode, tw, th, overlap, full, 0.5, input_width=64, input_height=64, source="test")


# overlap * tile is a whole number of pixels in each case (fractional: test_overlap_fraction_of_a_pixel_is_kept)
@pytest.mark.parametrize(("tile", "overlap"), [(64, 0.25), (200, 0.25), (640, 0.5), (200, 0.0), (256, 0.75)])
def test_axis_starts_properties(tile: int, overlap: float) -> None:
    need = math.ceil(overlap * tile)  # the smallest whole-pixel overlap that is >= overlap * tile
    for length in range(tile + 1, 6 * tile):
        starts = axis_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + tile == length, (length, starts)
        assert starts == sorted(set(starts))
        assert all(tile - (b - a) >= overlap * tile for a, b in itertools.pairwise(starts)), (length, starts)
        # one tile fewer, each sharing at least `need` pixels with its neighbour, reaches at most this far
        fewer = len(starts) - 1
        assert tile + (fewer - 1) * (tile - need) < length, f"{length}: {len(starts)} tiles is not the fewest"


@pytest.mark.parametrize("length", [1, 63, 64])
def test_axis_no_longer_than_a_tile_is_one_window(length: int) -> None:
    assert axis_starts(length, 64, 0.25) == [0]


def test_axis_starts_hand_worked() -> None:
    # 1000 px, 200 px tiles sharing >= 50 px: 6 tiles reach 200 + 5 * 150 = 950 < 1000, so 7, spaced 800 / 6
    assert axis_starts(1000, 200, 0.25) == [0, 133, 267, 400, 533, 667, 800]
    assert axis_starts(201, 200, 0.25) == [0, 1]
    assert axis_starts(400, 200, 0.0) == [0, 200]


def test_overlap_fraction_of_a_pixel_is_kept() -> None:
    # 0.3 * 64 = 19.2 px: three 64 px tiles over 153 px share 3 * 64 - 153 = 39 px in two gaps, so one has 19 < 19.2
    starts = axis_starts(153, 64, 0.3)
    overlaps = [64 - (b - a) for a, b in itertools.pairwise(starts)]
    assert min(overlaps) >= 0.3 * 64, f"axis_starts(153, 64, 0.3) = {starts}: overlaps {overlaps} < 19.2 px"


def _coverage(width: int, height: int, windows: tuple[tuple[int, int, int, int], ...]) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in windows:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        mask[y0:y1, x0:x1] = True
    return mask


@pytest.mark.parametrize(
    ("width", "height", "tile"),
    [(2449, 2047, (640, 512)), (401, 199, (200, 200)), (1000, 800, (200, 200)), (257, 3001, (256, 256))],
)
def test_plan_covers_every_pixel_with_tile_sized_windows(width: int, height: int, tile: tuple[int, int]) -> None:
    plan = plan_frame(width, height, _policy("on", tile))
    assert plan.tiled and (plan.width, plan.height) == (width, height)
    assert _coverage(width, height, plan.windows).all()
    tw, th = tile
    for x0, y0, x1, y1 in plan.windows:
        assert (x1 - x0, y1 - y0) == (min(tw, width), min(th, height))
    xs = axis_starts(width, tw, 0.25)
    ys = axis_starts(height, th, 0.25)
    assert [w[:2] for w in plan.windows] == [(x, y) for y in ys for x in xs]  # row-major
    assert plan.inputs == len(xs) * len(ys)


def test_odd_frame_shorter_than_a_tile_on_one_side() -> None:
    plan = plan_frame(401, 199, _policy("auto", (200, 200)))
    assert plan.tiled  # 401 > 1.25 * 200
    assert plan.windows == ((0, 0, 200, 199), (100, 0, 300, 199), (201, 0, 401, 199))


@pytest.mark.parametrize("mode", ["auto", "on", "off"])
@pytest.mark.parametrize(("width", "height"), [(150, 90), (200, 200), (1, 1)])
def test_frame_no_larger_than_a_tile_is_one_whole_window(mode: TilingMode, width: int, height: int) -> None:
    plan = plan_frame(width, height, _policy(mode, (200, 200), full=True))
    assert plan.windows == ((0, 0, width, height),)
    assert plan.tiled is (mode == "on")


def test_auto_tiles_only_past_the_margin() -> None:
    policy = _policy("auto", (200, 160))
    limit_w, limit_h = int(AUTO_MARGIN * 200), int(AUTO_MARGIN * 160)  # 250, 200
    assert not plan_frame(limit_w, limit_h, policy).tiled
    assert plan_frame(limit_w, limit_h, policy).windows == ((0, 0, limit_w, limit_h),)
    assert plan_frame(limit_w + 1, limit_h, policy).tiled
    assert plan_frame(limit_w, limit_h + 1, policy).tiled
    assert plan_frame(limit_w + 1, 10, policy).tiled


@pytest.mark.parametrize(("width", "height"), [(5000, 3000), (201, 201)])
def test_mode_on_and_off(width: int, height: int) -> None:
    assert plan_frame(width, height, _policy("on")).inputs > 1
    off = plan_frame(width, height, _policy("off"))
    assert not off.tiled and off.windows == ((0, 0, width, height),)


def test_full_frame_pass_only_when_tiled_into_several() -> None:
    tiled = plan_frame(1000, 800, _policy("auto", full=True))
    plain = plan_frame(1000, 800, _policy("auto", full=False))
    assert tiled.windows == (*plain.windows, (0, 0, 1000, 800))
    assert plan_frame(240, 240, _policy("auto", full=True)).windows == ((0, 0, 240, 240),)  # not tiled
    assert plan_frame(180, 180, _policy("on", full=True)).windows == ((0, 0, 180, 180),)  # tiled, one tile
    assert plan_frame(1000, 800, _policy("off", full=True)).windows == ((0, 0, 1000, 800),)


def test_no_native_scale() -> None:
    auto = _policy("auto", None)
    assert auto.tile_size() == (64, 64)
    assert plan_frame(10_000, 10_000, auto).windows == ((0, 0, 10_000, 10_000),)
    on = plan_frame(100, 64, _policy("on", None, overlap=0.25))
    assert on.windows == ((0, 0, 64, 64), (36, 0, 100, 64))


def _tiled(bundle: ModelBundle, **kw: Any) -> ModelBundle:
    return bundle.model_copy(update={"tiling": TilingSpec(**kw)})


@pytest.mark.parametrize(
    ("bundle_mode", "settings_mode", "request_mode", "expected"),
    [
        ("off", None, None, "off"),
        ("off", "on", None, "on"),
        ("off", "on", "auto", "auto"),
        ("on", None, "off", "off"),
        ("auto", "off", "on", "on"),
    ],
)
def test_mode_precedence(
    bundle: ModelBundle,
    bundle_mode: TilingMode,
    settings_mode: TilingMode | None,
    request_mode: TilingMode | None,
    expected: TilingMode,
) -> None:
    b = _tiled(bundle, mode=bundle_mode, tile_width=200, tile_height=200)
    assert resolve_policy(b, TilingSettings(mode=settings_mode), request_mode).mode == expected


def test_bundle_tiling_is_used(bundle: ModelBundle) -> None:
    b = _tiled(bundle, tile_width=200, tile_height=150, overlap=0.4, full_frame=True, match_iou=0.3, source="NEU")
    p = resolve_policy(b, TilingSettings())
    assert (p.mode, p.tile_size(), p.overlap, p.full_frame, p.match_iou) == ("auto", (200, 150), 0.4, True, 0.3)
    assert (p.input_width, p.input_height, p.source) == (64, 64, "NEU")
    override = TilingSettings(overlap=0.0, full_frame=False, match_iou=0.9)  # falsy values still override
    q = resolve_policy(b, override)
    assert (q.overlap, q.full_frame, q.match_iou) == (0.0, False, 0.9)


def test_native_tile_setting_overrides_the_bundle(bundle: ModelBundle) -> None:
    b = _tiled(bundle, tile_width=200, tile_height=200)
    assert resolve_policy(b, TilingSettings(native_tile=300)).tile_size() == (300, 300)
    wide = b.model_copy(update={"input": InputSpec(width=128, height=64)})
    p = resolve_policy(wide, TilingSettings(native_tile=301))
    assert p.tile_size() == (301, 150)  # height follows the 128 x 64 input: round(301 / 2)
    assert "native_tile" in p.source


def test_bundle_without_tiling(bundle: ModelBundle) -> None:
    assert bundle.tiling is None and (bundle.input.width, bundle.input.height) == (64, 64)
    auto = resolve_policy(bundle, TilingSettings())
    assert (auto.mode, auto.tile_width, auto.tile_height) == ("auto", None, None)
    assert (auto.overlap, auto.full_frame, auto.match_iou) == (0.25, False, 0.5)
    assert plan_frame(4000, 3000, auto).windows == ((0, 0, 4000, 3000),)
    on = resolve_policy(bundle, TilingSettings(), "on")
    assert on.tile_size() == (64, 64)
    plan = plan_frame(200, 100, on)
    assert plan.tiled and all((x1 - x0, y1 - y0) == (64, 64) for x0, y0, x1, y1 in plan.windows)
    assert _coverage(200, 100, plan.windows).all()
    native = resolve_policy(bundle, TilingSettings(native_tile=100))
    assert native.tile_size() == (100, 100) and plan_frame(200, 100, native).tiled
