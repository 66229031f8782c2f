"""service/core/preprocess.py: decoding (bad-input table, conversions), letterbox geometry and the round trip."""

from __future__ import annotations

import struct

import numpy as np
import numpy.typing as npt
import pytest

from service.core.bundle import InputSpec
from service.core.errors import ImageTooLarge, InvalidImage, TruncatedImage, ZeroSizeImage
from service.core.postprocess import postprocess
from service.core.preprocess import (
    Frame,
    Window,
    decode_frame,
    decode_image,
    fill_input,
    frame_to_rgb,
    input_dtype,
    letterbox,
    letterbox_geometry,
    new_batch,
    probe_image,
    to_chw,
    to_input,
    window_info,
)
from tests.synthetic import encode_image, make_image_bytes


@pytest.mark.parametrize("fmt", ["jpeg", "png", "bmp", "tiff"])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_decode_formats_and_channels(fmt: str, channels: int) -> None:
    img = decode_image(make_image_bytes(50, 30, fmt, channels), max_pixels=10_000)
    assert img.shape == (30, 50, 3) and img.dtype == np.uint8


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_sixteen_bit_is_scaled_to_eight(fmt: str) -> None:
    rgb16 = np.zeros((8, 8, 3), np.uint16)
    rgb16[..., 0] = 65535
    rgb16[..., 1] = 257 * 100
    img = decode_image(encode_image(rgb16, fmt), max_pixels=100)
    assert img[0, 0].tolist() == [255, 100, 0]


def test_gray_and_alpha_conversion_keeps_values() -> None:
    gray = np.full((4, 4), 77, np.uint8)
    assert decode_image(encode_image(gray, "png"), max_pixels=100)[0, 0].tolist() == [77, 77, 77]
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    assert decode_image(encode_image(rgba, "png"), max_pixels=100)[0, 0].tolist() == [200, 0, 0]


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\0\0\0\0" + b"IEND"


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (b"", InvalidImage, "empty"),
        (b"hello, this is not an image at all", InvalidImage, "expected JPEG, PNG, BMP or TIFF"),
        (make_image_bytes(64, 64, "jpeg")[:300], TruncatedImage, "truncated JPEG"),
        (make_image_bytes(64, 64, "png")[:-20], TruncatedImage, "truncated PNG"),
        (make_image_bytes(64, 64, "bmp")[:200], InvalidImage, "BMP"),
        (make_image_bytes(64, 64, "tiff")[:100], TruncatedImage, "TIFF"),
        (_png_header(0, 10), ZeroSizeImage, "zero size"),
        (_png_header(100_000, 100_000), ImageTooLarge, "over the limit"),
    ],
    ids=["empty", "not-image", "trunc-jpeg", "trunc-png", "trunc-bmp", "trunc-tiff", "zero-size", "bomb"],
)
def test_bad_input_table(data: bytes, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        decode_image(data, max_pixels=4096 * 4096)


def test_pixel_limit_is_checked_from_the_header() -> None:
    data = make_image_bytes(200, 100, "jpeg")
    assert probe_image(data) == ("jpeg", 200, 100)
    with pytest.raises(ImageTooLarge, match="200x100"):
        decode_image(data, max_pixels=200 * 100 - 1)


@pytest.mark.parametrize(("h", "w"), [(480, 640), (640, 480), (200, 200), (31, 500), (640, 640), (1000, 999)])
def test_letterbox_geometry(h: int, w: int) -> None:
    img = np.full((h, w, 3), 255, np.uint8)
    out, info = letterbox(img, (320, 320), pad_value=114)
    assert out.shape == (320, 320, 3)
    new_w, new_h = round(w * info.scale), round(h * info.scale)
    assert info.scale == pytest.approx(min(320 / h, 320 / w))
    assert (out[int(info.pad_y) : int(info.pad_y) + new_h, int(info.pad_x) : int(info.pad_x) + new_w] == 255).all()
    assert (out == 114).sum() == (320 * 320 - new_w * new_h) * 3
    assert (info.src_width, info.src_height) == (w, h)


def test_letterbox_round_trip_through_postprocess() -> None:
    # A box drawn in the original image, mapped into the letterboxed input by hand and back by postprocess.
    h, w = 300, 500
    img = np.zeros((h, w, 3), np.uint8)
    x1, y1, x2, y2 = 100, 50, 260, 210
    img[y1:y2, x1:x2] = 255
    lb, info = letterbox(img, (256, 256))
    ys, xs = np.nonzero(lb[..., 0] > 128)
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    bw, bh = xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()
    out = np.array([[[cx], [cy], [bw], [bh], [0.9]]], np.float32)
    det = postprocess(out, [info], [0.5])[0]
    np.testing.assert_allclose(det.boxes_xyxy[0], [x1, y1, x2, y2], atol=1.0 / info.scale + 0.5)


def test_to_input_normalises_as_the_spec_says() -> None:
    spec = InputSpec(width=32, height=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0))
    img = np.full((32, 32, 3), 255, np.uint8)
    x = to_input([img, img], spec)
    assert x.shape == (2, 3, 32, 32) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 0, 0], [1.0, 2.0, 0.5])
    np.testing.assert_allclose(to_chw(img, spec), x[0])
    with pytest.raises(ValueError, match="letterbox it first"):
        to_input([np.zeros((10, 10, 3), np.uint8)], spec)


BIG = 10**8  # pixel limit that no test image reaches


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_decode_frame_keeps_mono_mono(fmt: str) -> None:
    frame = decode_frame(make_image_bytes(50, 30, fmt, channels=1), max_pixels=BIG)
    assert frame.order == "gray" and frame.pixels.shape == (30, 50) and frame.pixels.dtype == np.uint8
    assert (frame.width, frame.height, frame.reduction) == (50, 30, 1.0)


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_decode_frame_keeps_colour_in_bgr(fmt: str) -> None:
    frame = decode_frame(make_image_bytes(50, 30, fmt, channels=3), max_pixels=BIG)
    assert frame.order == "bgr" and frame.pixels.shape == (30, 50, 3)
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    assert decode_frame(encode_image(red, "png"), max_pixels=BIG).pixels[0, 0].tolist() == [0, 0, 255]


@pytest.mark.parametrize("fmt", ["jpeg", "png", "bmp", "tiff"])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_frame_to_rgb_is_decode_image(fmt: str, channels: int) -> None:
    data = make_image_bytes(50, 30, fmt, channels)
    assert np.array_equal(frame_to_rgb(decode_frame(data, max_pixels=BIG)), decode_image(data, max_pixels=BIG))


@pytest.mark.parametrize("channels", [1, 3])
def test_large_jpeg_decodes_reduced(channels: int) -> None:
    data = make_image_bytes(1600, 1200, "jpeg", channels)
    frame = decode_frame(data, max_pixels=BIG, reduce_to=(64, 64))
    assert frame.pixels.shape[:2] == (150, 200)  # the codec's 1/8 scale (64 px still fit: 150 x 0.32 = 48)
    assert frame.order == ("gray" if channels == 1 else "bgr")
    assert (frame.width, frame.height, frame.reduction) == (1600, 1200, 0.125)
    assert decode_frame(data, max_pixels=BIG).pixels.shape[:2] == (1200, 1600)
    # only as far as the letterbox still shrinks: 1/2 leaves 600 x 800 for a 640 x 640 input, 1/4 would not
    assert decode_frame(data, max_pixels=BIG, reduce_to=(640, 640)).pixels.shape[:2] == (600, 800)
    png = make_image_bytes(1600, 1200, "png", channels)  # only JPEG has reduced decoding
    assert decode_frame(png, max_pixels=BIG, reduce_to=(64, 64)).pixels.shape[:2] == (1200, 1600)


def _frames(width: int, height: int) -> dict[str, Frame]:
    gray = decode_frame(make_image_bytes(width, height, "png", channels=1), max_pixels=BIG)
    bgr = decode_frame(make_image_bytes(width, height, "png", channels=3, seed=1), max_pixels=BIG)
    rgb = Frame(frame_to_rgb(bgr), "rgb", width, height)
    return {"gray": gray, "bgr": bgr, "rgb": rgb}


SPECS = [
    InputSpec(width=64, height=64),
    InputSpec(width=96, height=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), pad_value=0),
]


def _filled(frame: Frame, window: Window, spec: InputSpec) -> npt.NDArray[np.float32]:
    out = np.full((3, spec.height, spec.width), np.nan, np.float32)  # every element must be written
    fill_input(out, frame, window, spec)
    return out


@pytest.mark.parametrize("order", ["gray", "bgr", "rgb"])
@pytest.mark.parametrize("size", [(50, 30), (64, 64), (31, 97), (300, 200)])
@pytest.mark.parametrize("spec", SPECS, ids=["square", "wide-normalised"])
def test_fill_input_whole_frame_is_letterbox(order: str, size: tuple[int, int], spec: InputSpec) -> None:
    frame = _frames(*size)[order]
    expected = to_chw(letterbox(frame_to_rgb(frame), (spec.height, spec.width), spec.pad_value)[0], spec)
    assert np.array_equal(_filled(frame, (0, 0, frame.width, frame.height), spec), expected)


@pytest.mark.parametrize("order", ["gray", "bgr", "rgb"])
@pytest.mark.parametrize("window", [(100, 50, 228, 178), (0, 0, 64, 64), (250, 150, 300, 200), (37, 11, 141, 60)])
def test_fill_input_tile_is_letterbox_of_the_crop(order: str, window: Window) -> None:
    frame, spec = _frames(300, 200)[order], SPECS[1]
    x0, y0, x1, y1 = window
    crop = frame_to_rgb(frame)[y0:y1, x0:x1]
    expected = to_chw(letterbox(crop, (spec.height, spec.width), spec.pad_value)[0], spec)
    assert np.array_equal(_filled(frame, window, spec), expected)


def test_window_info_maps_frame_points_into_the_input() -> None:
    pixels = np.zeros((300, 400), np.uint8)
    pixels[100:108, 180:188] = 255  # an 8 px block at even offsets from the window's corner
    frame = Frame(pixels, "gray", 400, 300)
    window = (120, 60, 248, 156)  # 128 x 96 into 64 x 64: scale 0.5, new 64 x 48, 8 px pad top and bottom
    info = window_info(frame, window, (64, 64))
    assert (info.scale, info.pad_x, info.pad_y) == (0.5, 0.0, 8.0)
    assert (info.offset_x, info.offset_y, info.src_width, info.src_height) == (120, 60, 128, 96)
    out = _filled(frame, window, InputSpec(width=64, height=64))
    ys, xs = np.nonzero(out[0] > 0.5)
    # a 2x bilinear shrink averages pixel pairs, so a block at even offsets stays sharp: x [180, 188) -> [30, 34),
    # y [100, 108) -> [28, 32) after the 8 px pad
    x_in = ((180 - info.offset_x) * info.scale + info.pad_x, (188 - info.offset_x) * info.scale + info.pad_x)
    y_in = ((100 - info.offset_y) * info.scale + info.pad_y, (108 - info.offset_y) * info.scale + info.pad_y)
    assert (x_in, y_in) == ((30.0, 34.0), (28.0, 32.0))
    assert (int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1) == (30, 34, 28, 32)
    back = ((30 - info.pad_x) / info.scale + info.offset_x, (28 - info.pad_y) / info.scale + info.offset_y)
    assert back == (180, 100)


@pytest.mark.parametrize(("width", "height"), [(1600, 1200), (1203, 1600), (1601, 1201), (4001, 1000)])
def test_window_info_of_a_reduced_decode(width: int, height: int) -> None:
    frame = decode_frame(make_image_bytes(width, height, "jpeg"), max_pixels=BIG, reduce_to=(64, 64))
    assert frame.reduction < 0.2
    info = window_info(frame, (0, 0, width, height), (64, 64))
    assert (info.src_width, info.src_height, info.offset_x, info.offset_y) == (width, height, 0, 0)
    # the codec rounds each reduced side up to whole pixels (ceil(side / 8)), so the effective gain differs from the
    # full-size letterbox gain by < 1 reduced pixel per side: under 1% for sides of >= 1000 px
    assert info.scale == pytest.approx(min(64 / height, 64 / width), rel=0.01)


@pytest.mark.parametrize("src_hw", [(1, 20000), (20000, 1)])
def test_letterbox_geometry_refuses_a_side_of_zero(src_hw: tuple[int, int]) -> None:
    with pytest.raises(ZeroSizeImage, match="too elongated"):
        letterbox_geometry(src_hw, (64, 64))
    assert letterbox_geometry((200, 20000), (64, 64))[1:3] == (64, 1)  # 200 * 0.0032 rounds to 1 px: still fine


U8_SPECS = [s.model_copy(update={"layout": "NHWC", "dtype": "uint8"}) for s in SPECS]


def _filled_u8(frame: Frame, window: Window, spec: InputSpec) -> npt.NDArray[np.uint8]:
    out = new_batch(spec, 2)[1]
    assert out.shape == (spec.height, spec.width, 3) and out.dtype == np.uint8 and input_dtype(spec) is np.uint8
    out[...] = np.arange(out.size, dtype=np.uint32).reshape(out.shape) % 251  # every element must be written
    fill_input(out, frame, window, spec)
    return out


@pytest.mark.parametrize("order", ["gray", "bgr", "rgb"])
@pytest.mark.parametrize("window", [(0, 0, 300, 200), (100, 50, 228, 178), (250, 150, 300, 200), (37, 11, 141, 60)])
@pytest.mark.parametrize("i", [0, 1], ids=["square", "wide-normalised"])
def test_fill_input_uint8_is_the_letterboxed_rgb_pixels(order: str, window: Window, i: int) -> None:
    """The uint8 NHWC row is the letterboxed RGB crop (grey expanded, pad value around), and normalising it as the
    graph does gives the float row bit for bit."""
    frame, spec, u8 = _frames(300, 200)[order], SPECS[i], U8_SPECS[i]
    x0, y0, x1, y1 = window
    boxed = letterbox(frame_to_rgb(frame)[y0:y1, x0:x1], (spec.height, spec.width), spec.pad_value)[0]
    row = _filled_u8(frame, window, u8)
    assert np.array_equal(row, boxed) and np.array_equal(to_input([boxed], u8)[0], row)
    assert np.array_equal(to_chw(row, spec), _filled(frame, window, spec))


def test_new_batch_and_to_input_follow_the_spec() -> None:
    assert new_batch(SPECS[1], 3).shape == (3, 3, 64, 96) and new_batch(SPECS[1], 3).dtype == np.float32
    assert new_batch(U8_SPECS[1], 3).shape == (3, 64, 96, 3) and new_batch(U8_SPECS[1], 3).dtype == np.uint8
    images = [np.full((64, 96, 3), v, np.uint8) for v in (0, 255)]
    x = to_input(images, U8_SPECS[1])
    assert x.dtype == np.uint8 and x.shape == (2, 64, 96, 3) and x[1].min() == 255
    assert to_input(images, SPECS[1]).shape == (2, 3, 64, 96)
