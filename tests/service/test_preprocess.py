"""service/preprocess.py: decoding (bad-input table, conversions), letterbox geometry and the round trip."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from service.bundle import InputSpec
from service.errors import ImageTooLarge, InvalidImage, TruncatedImage, ZeroSizeImage
from service.postprocess import postprocess
from service.preprocess import decode_image, letterbox, probe_image, to_chw, to_input
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
