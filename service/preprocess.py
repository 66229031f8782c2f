"""Image bytes -> RGB uint8 -> letterbox -> NCHW float32, plus the :class:`LetterboxInfo` that maps boxes back.

This is the one copy of decoding and letterboxing: train/ (augmentation, evaluation) and export/ (parity, calibration)
call it, so training, evaluation and serving see identical pixels. numpy + OpenCV only.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from service.bundle import InputSpec
from service.errors import ImageTooLarge, InvalidImage, TruncatedImage, ZeroSizeImage

__all__ = [
    "SUPPORTED_MEDIA_TYPES",
    "LetterboxInfo",
    "decode_image",
    "letterbox",
    "probe_image",
    "to_chw",
    "to_input",
]

SUPPORTED_MEDIA_TYPES = ("image/jpeg", "image/png", "image/bmp", "image/tiff")
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}


@dataclass(frozen=True)
class LetterboxInfo:
    """How an image was letterboxed: ``input = original * scale + (pad_x, pad_y)`` in pixels."""

    scale: float  # gain = min(out_h / src_h, out_w / src_w)
    pad_x: float  # left padding in output pixels
    pad_y: float  # top padding in output pixels
    src_width: int
    src_height: int


@dataclass(frozen=True)
class _Probe:
    fmt: str  # "jpeg" | "png" | "bmp" | "tiff"
    width: int | None  # None when the header does not say (then the size is checked after decoding)
    height: int | None
    data_start: int = 0  # JPEG: offset of the first SOS segment (entropy-coded data follows)


def _probe_jpeg(data: bytes) -> _Probe:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise InvalidImage("corrupt JPEG: expected a marker in the header")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_STANDALONE:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _JPEG_SOF:
            if i + 9 > n:
                break
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return _Probe("jpeg", width, height, _find_sos(data, i + 2 + length))
        if marker == 0xDA:
            return _Probe("jpeg", None, None, i)
        i += 2 + length
    raise TruncatedImage("truncated JPEG: the file ends inside its header")


def _find_sos(data: bytes, start: int) -> int:
    pos = data.find(b"\xff\xda", start)
    if pos < 0:
        raise TruncatedImage("truncated JPEG: no image data (start-of-scan marker missing)")
    return pos


def _probe_tiff(data: bytes) -> _Probe:
    endian = "<" if data[:2] == b"II" else ">"
    if len(data) < 8:
        raise TruncatedImage("truncated TIFF header")
    (ifd,) = struct.unpack(endian + "I", data[4:8])
    if ifd + 2 > len(data):
        raise TruncatedImage("truncated TIFF: first directory lies past the end of the file")
    (count,) = struct.unpack(endian + "H", data[ifd : ifd + 2])
    dims: dict[int, int] = {}
    for k in range(count):
        off = ifd + 2 + 12 * k
        if off + 12 > len(data):
            raise TruncatedImage("truncated TIFF: directory ends past the end of the file")
        tag, typ = struct.unpack(endian + "HH", data[off : off + 4])
        if tag in (256, 257):
            fmt = endian + ("H" if typ == 3 else "I")
            dims[tag] = struct.unpack(fmt, data[off + 8 : off + 8 + struct.calcsize(fmt)])[0]
    return _Probe("tiff", dims.get(256), dims.get(257))


def probe_image(data: bytes) -> tuple[str, int | None, int | None]:
    """Format and size from the header alone, without decoding pixels (the decompression-bomb guard).

    Returns:
        ``(format, width, height)``; width/height are None when the header does not state them.

    Raises:
        InvalidImage: not JPEG, PNG, BMP or TIFF. TruncatedImage: the header itself is cut off.
    """
    p = _probe(data)
    return p.fmt, p.width, p.height


def _probe(data: bytes) -> _Probe:
    if data[:3] == b"\xff\xd8\xff":
        return _probe_jpeg(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if len(data) < 24:
            raise TruncatedImage("truncated PNG header")
        width, height = struct.unpack(">II", data[16:24])
        return _Probe("png", width, height)
    if data[:2] == b"BM":
        if len(data) < 26:
            raise TruncatedImage("truncated BMP header")
        (dib,) = struct.unpack("<I", data[14:18])
        if dib == 12:
            width, height = struct.unpack("<HH", data[18:22])
        else:
            width, height = struct.unpack("<ii", data[18:26])
        return _Probe("bmp", abs(width), abs(height))
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return _probe_tiff(data)
    raise InvalidImage("not a supported image: expected JPEG, PNG, BMP or TIFF bytes")


def _check_size(width: int | None, height: int | None, max_pixels: int) -> None:
    if width is None or height is None:
        return
    if width == 0 or height == 0:
        raise ZeroSizeImage(f"image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")


def _check_complete(data: bytes, probe: _Probe) -> None:
    # libjpeg decodes a cut-off JPEG into a half-grey image without an error, so look for the end-of-image marker
    # after the scan data; trailers some cameras append after it stay allowed.
    if probe.fmt == "jpeg" and data.find(b"\xff\xd9", probe.data_start) < 0:
        raise TruncatedImage("truncated JPEG: end-of-image marker missing")
    if probe.fmt == "png" and data.rfind(b"IEND") < 0:
        raise TruncatedImage("truncated PNG: IEND chunk missing")


def _to_rgb_uint8(img: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """OpenCV ``IMREAD_UNCHANGED`` output (gray / BGR / BGRA, 8/16-bit or float) -> RGB uint8."""
    if img.dtype == np.uint16:
        img = ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif img.dtype.kind == "f":
        scale = 255.0 if float(np.nanmax(img)) <= 1.0 else 1.0
        img = np.clip(np.nan_to_num(img.astype(np.float32)) * scale, 0, 255).round().astype(np.uint8)
    elif img.dtype != np.uint8:
        raise InvalidImage(f"unsupported pixel type {img.dtype}")
    if img.ndim == 2:
        return np.asarray(cv2.cvtColor(img, cv2.COLOR_GRAY2RGB), dtype=np.uint8)
    channels = img.shape[2]
    if channels == 1 or channels == 2:  # gray (+ alpha)
        return np.asarray(cv2.cvtColor(np.ascontiguousarray(img[:, :, 0]), cv2.COLOR_GRAY2RGB), dtype=np.uint8)
    if channels == 3:
        return np.asarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), dtype=np.uint8)
    if channels == 4:
        return np.asarray(cv2.cvtColor(img, cv2.COLOR_BGRA2RGB), dtype=np.uint8)
    raise InvalidImage(f"unsupported channel count {channels}")


def decode_image(data: bytes, *, max_pixels: int) -> npt.NDArray[np.uint8]:
    """Decode JPEG/PNG/BMP/TIFF bytes into an ``(H, W, 3)`` RGB uint8 array.

    Grayscale, 16-bit and 4-channel (alpha dropped) images are converted. The pixel limit is checked from the header
    before any pixel is decoded.

    Raises:
        ImageError subclasses: InvalidImage, TruncatedImage, ZeroSizeImage, ImageTooLarge.
    """
    if not data:
        raise InvalidImage("empty image")
    probe = _probe(data)
    _check_size(probe.width, probe.height, max_pixels)
    _check_complete(data, probe)
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise InvalidImage(f"could not decode the {probe.fmt.upper()} image (corrupt or truncated)")
    _check_size(int(img.shape[1]), int(img.shape[0]), max_pixels)
    return _to_rgb_uint8(img)


def letterbox(
    image: npt.NDArray[np.uint8], out_hw: tuple[int, int], pad_value: int = 114
) -> tuple[npt.NDArray[np.uint8], LetterboxInfo]:
    """Resize keeping the aspect ratio and centre into ``out_hw`` (height, width), padding with ``pad_value``.

    Ultralytics semantics, so boxes line up with training: ``new_unpad = round(w*r), round(h*r)``, padding split as
    ``top = round(dh - 0.1)``, ``left = round(dw - 0.1)``; bilinear resize, skipped when the size is unchanged.
    Upscaling is allowed.
    """
    src_h, src_w = image.shape[:2]
    out_h, out_w = out_hw
    r = min(out_h / src_h, out_w / src_w)
    new_w, new_h = round(src_w * r), round(src_h * r)
    dw, dh = (out_w - new_w) / 2, (out_h - new_h) / 2
    if (new_w, new_h) != (src_w, src_h):
        image = np.asarray(cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR), dtype=np.uint8)
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    if top or bottom or left or right:
        value = (pad_value, pad_value, pad_value)
        image = np.asarray(
            cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=value), dtype=np.uint8
        )
    return image, LetterboxInfo(scale=r, pad_x=float(left), pad_y=float(top), src_width=src_w, src_height=src_h)


def _normalise(x: npt.NDArray[np.float32], spec: InputSpec, channel_axis: int) -> npt.NDArray[np.float32]:
    x *= np.float32(spec.scale)
    if any(spec.mean) or any(s != 1.0 for s in spec.std):
        shape = [1] * x.ndim
        shape[channel_axis] = 3
        x -= np.asarray(spec.mean, dtype=np.float32).reshape(shape)
        x /= np.asarray(spec.std, dtype=np.float32).reshape(shape)
    return x


def to_chw(image: npt.NDArray[np.uint8], spec: InputSpec) -> npt.NDArray[np.float32]:
    """One letterboxed ``(H, W, 3)`` RGB uint8 image -> ``(3, H, W)`` float32, normalised as the bundle says."""
    x = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
    return _normalise(x, spec, channel_axis=0)


def to_input(images: Sequence[npt.NDArray[np.uint8]], spec: InputSpec) -> npt.NDArray[np.float32]:
    """Letterboxed ``(H, W, 3)`` RGB uint8 images -> ``(B, 3, H, W)`` float32 network input."""
    if not images:
        raise ValueError("to_input needs at least one image")
    expected = (spec.height, spec.width, 3)
    for i, im in enumerate(images):
        if im.shape != expected:
            raise ValueError(f"image {i} has shape {im.shape}, expected {expected} (letterbox it first)")
    x = np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2), dtype=np.float32)
    return _normalise(x, spec, channel_axis=1)
