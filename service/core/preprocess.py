"""Image bytes -> pixels (:class:`Frame`) -> letterbox -> the model input (NCHW float32, or NHWC uint8 for a bundle
whose graph normalises its own input), plus the :class:`LetterboxInfo` that maps boxes back.

This is the one copy of decoding and letterboxing: train/ (augmentation, evaluation) and export/ (parity, calibration)
call it, so training, evaluation and serving see identical pixels. The service decodes once, into the pixels the codec
gives (mono stays mono, colour stays in OpenCV's BGR order) and converts only the pixels that reach the model input
(:func:`fill_input`). numpy + OpenCV only.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt

from service.core.bundle import InputSpec
from service.core.errors import ImageTooLarge, InvalidImage, TruncatedImage, ZeroSizeImage

__all__ = [
    "SUPPORTED_MEDIA_TYPES",
    "Frame",
    "LetterboxInfo",
    "Window",
    "decode_frame",
    "decode_image",
    "fill_input",
    "frame_to_rgb",
    "input_dtype",
    "letterbox",
    "letterbox_geometry",
    "new_batch",
    "pad_batch",
    "probe_image",
    "to_chw",
    "to_input",
    "window_info",
]

SUPPORTED_MEDIA_TYPES = ("image/jpeg", "image/png", "image/bmp", "image/tiff")
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}


@dataclass(frozen=True)
class LetterboxInfo:
    """How an image (or a window of a frame) was letterboxed:
    ``input = (original - (offset_x, offset_y)) * scale + (pad_x, pad_y)`` in pixels.

    ``src_width`` x ``src_height`` is the letterboxed region in original pixels (the whole image, or one tile);
    ``offset`` is its top-left corner in the frame (0 for a whole image). Boxes map back into that region.
    """

    scale: float  # gain = min(out_h / src_h, out_w / src_w), input pixels per original pixel
    pad_x: float  # left padding in output pixels
    pad_y: float  # top padding in output pixels
    src_width: int
    src_height: int
    offset_x: int = 0
    offset_y: int = 0


@dataclass(frozen=True)
class Frame:
    """A decoded frame, as the codec gave it: no colour conversion, no copy.

    ``pixels`` is ``(h, w)`` uint8 for mono images or ``(h, w, 3)`` uint8 in ``order``. ``width`` x ``height`` is the
    frame's size in original pixels; ``pixels`` is ``ceil(side * reduction)`` when the JPEG was decoded at a reduced
    size (``IMREAD_REDUCED_*``).
    """

    pixels: npt.NDArray[np.uint8]
    order: Literal["gray", "bgr", "rgb"]
    width: int
    height: int
    reduction: float = 1.0  # decoded pixels per original pixel: 1, or 1/2, 1/4, 1/8 (the codec's exact DCT scale)


@dataclass(frozen=True)
class _Probe:
    fmt: str  # "jpeg" | "png" | "bmp" | "tiff"
    width: int | None  # None when the header does not say (then the size is checked after decoding)
    height: int | None
    data_start: int = 0  # JPEG: offset of the first SOS segment (entropy-coded data follows)
    mono: bool | None = None  # the header says one 8-bit grey channel (JPEG, PNG); None: not known
    plain: bool = False  # 8-bit, no alpha: OpenCV's IMREAD_COLOR / IMREAD_GRAYSCALE decode it exactly


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
            if i + 10 > n:
                break
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            components = data[i + 9]
            return _Probe("jpeg", width, height, _find_sos(data, i + 2 + length), components == 1, components in (1, 3))
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
        depth, color_type = (data[24], data[25]) if len(data) >= 26 else (0, -1)
        # color type 0 grey, 2 RGB, 3 palette, 4 grey+alpha, 6 RGBA; alpha is dropped either way (as IMREAD_COLOR)
        return _Probe("png", width, height, 0, color_type in (0, 4), depth == 8 and color_type in (0, 2, 3, 4, 6))
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
    if probe.fmt == "jpeg" and data.rfind(b"\xff\xd9", probe.data_start) < 0:  # from the end: O(1) when present
        raise TruncatedImage("truncated JPEG: end-of-image marker missing")
    if probe.fmt == "png" and data.rfind(b"IEND") < 0:
        raise TruncatedImage("truncated PNG: IEND chunk missing")


def _to_uint8(img: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    if img.dtype == np.uint16:
        return np.asarray((img.astype(np.uint32) + 128) // 257, dtype=np.uint8)
    if img.dtype.kind == "f":
        scale = 255.0 if float(np.nanmax(img)) <= 1.0 else 1.0
        return np.asarray(np.clip(np.nan_to_num(img.astype(np.float32)) * scale, 0, 255).round(), dtype=np.uint8)
    if img.dtype != np.uint8:
        raise InvalidImage(f"unsupported pixel type {img.dtype}")
    return np.asarray(img, dtype=np.uint8)


def _as_frame_pixels(img: npt.NDArray[Any]) -> tuple[npt.NDArray[np.uint8], Literal["gray", "bgr"]]:
    """OpenCV ``IMREAD_UNCHANGED`` output (gray / BGR / BGRA, 8/16-bit or float) -> uint8 gray or BGR (alpha
    dropped, grey+alpha keeps the grey channel)."""
    img = _to_uint8(img)
    if img.ndim == 2:
        return img, "gray"
    channels = img.shape[2]
    if channels in (1, 2):
        return np.ascontiguousarray(img[:, :, 0]), "gray"
    if channels == 3:
        return img, "bgr"
    if channels == 4:
        return np.asarray(cv2.cvtColor(img, cv2.COLOR_BGRA2BGR), dtype=np.uint8), "bgr"
    raise InvalidImage(f"unsupported channel count {channels}")


_REDUCED = {  # factor -> (mono flag, colour flag); JPEG scales its DCT, so a reduced decode costs less than a full one
    2: (cv2.IMREAD_REDUCED_GRAYSCALE_2, cv2.IMREAD_REDUCED_COLOR_2),
    4: (cv2.IMREAD_REDUCED_GRAYSCALE_4, cv2.IMREAD_REDUCED_COLOR_4),
    8: (cv2.IMREAD_REDUCED_GRAYSCALE_8, cv2.IMREAD_REDUCED_COLOR_8),
}


def _reduction_factor(probe: _Probe, reduce_to: tuple[int, int] | None) -> int:
    """Largest JPEG reduction (2, 4, 8) that still leaves at least ``reduce_to`` (height, width) to letterbox from,
    so the final resize only ever shrinks. 1 when the frame is not a JPEG or not much larger."""
    if reduce_to is None or probe.fmt != "jpeg" or not probe.plain or probe.width is None or probe.height is None:
        return 1
    r = min(reduce_to[0] / probe.height, reduce_to[1] / probe.width)  # the letterbox gain on the full frame
    return next((k for k in (8, 4, 2) if k * r <= 1.0), 1)


def decode_frame(data: bytes, *, max_pixels: int, reduce_to: tuple[int, int] | None = None) -> Frame:
    """Decode JPEG/PNG/BMP/TIFF bytes once, into the pixels the model input will be made from.

    8-bit JPEG and PNG decode straight to grey (mono sensors) or BGR; 16-bit, float and alpha images are converted to
    8-bit grey or BGR. EXIF orientation is ignored: boxes are in the stored pixel grid, as the camera wrote it.

    Args:
        reduce_to: ``(height, width)`` the whole frame will be letterboxed to, when it is only downscaled (not
            tiled): a JPEG is then decoded at 1/2, 1/4 or 1/8 size by the codec (never below this size).

    Raises:
        ImageError subclasses: InvalidImage, TruncatedImage, ZeroSizeImage, ImageTooLarge. The pixel limit is checked
        from the header before any pixel is decoded.
    """
    if not data:
        raise InvalidImage("empty image")
    probe = _probe(data)
    _check_size(probe.width, probe.height, max_pixels)
    _check_complete(data, probe)
    buf = np.frombuffer(data, dtype=np.uint8)
    factor = _reduction_factor(probe, reduce_to)
    try:
        if probe.plain:
            mono = bool(probe.mono)
            full = cv2.IMREAD_GRAYSCALE if mono else cv2.IMREAD_COLOR
            flag = _REDUCED[factor][0 if mono else 1] if factor > 1 else full
            img = cv2.imdecode(buf, flag | cv2.IMREAD_IGNORE_ORIENTATION)
            order: Literal["gray", "bgr"] = "gray" if mono else "bgr"
        else:
            img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise InvalidImage(f"could not decode the {probe.fmt.upper()} image: {exc.msg or exc}") from exc
    if img is None or img.size == 0:
        raise InvalidImage(f"could not decode the {probe.fmt.upper()} image (corrupt or truncated)")
    if not probe.plain:
        img, order = _as_frame_pixels(img)
    height, width = (probe.height, probe.width) if factor > 1 else (int(img.shape[0]), int(img.shape[1]))
    assert height is not None and width is not None  # a reduced decode needs the header's size
    _check_size(width, height, max_pixels)
    return Frame(np.asarray(img, dtype=np.uint8), order, width, height, 1.0 / factor)


def frame_to_rgb(frame: Frame) -> npt.NDArray[np.uint8]:
    """The frame's pixels as ``(h, w, 3)`` RGB uint8 (a copy)."""
    if frame.order == "gray":
        return np.asarray(cv2.cvtColor(frame.pixels, cv2.COLOR_GRAY2RGB), dtype=np.uint8)
    if frame.order == "bgr":
        return np.asarray(cv2.cvtColor(frame.pixels, cv2.COLOR_BGR2RGB), dtype=np.uint8)
    return frame.pixels.copy()


def decode_image(data: bytes, *, max_pixels: int) -> npt.NDArray[np.uint8]:
    """Decode JPEG/PNG/BMP/TIFF bytes into an ``(H, W, 3)`` RGB uint8 array (:func:`decode_frame`, then RGB).

    Raises:
        ImageError subclasses: InvalidImage, TruncatedImage, ZeroSizeImage, ImageTooLarge.
    """
    return frame_to_rgb(decode_frame(data, max_pixels=max_pixels))


def letterbox_geometry(src_hw: tuple[int, int], out_hw: tuple[int, int]) -> tuple[float, int, int, int, int, int, int]:
    """``(gain, new_w, new_h, top, bottom, left, right)`` of letterboxing ``src_hw`` into ``out_hw`` (Ultralytics
    semantics, see :func:`letterbox`). Raises ZeroSizeImage when a side would shrink to 0 pixels."""
    src_h, src_w = src_hw
    out_h, out_w = out_hw
    r = min(out_h / src_h, out_w / src_w)
    new_w, new_h = round(src_w * r), round(src_h * r)
    if new_w < 1 or new_h < 1:
        raise ZeroSizeImage(
            f"image is {src_w}x{src_h}: letterboxed into {out_w}x{out_h} one side would be 0 pixels (too elongated)"
        )
    dw, dh = (out_w - new_w) / 2, (out_h - new_h) / 2
    return r, new_w, new_h, round(dh - 0.1), round(dh + 0.1), round(dw - 0.1), round(dw + 0.1)


def letterbox(
    image: npt.NDArray[np.uint8], out_hw: tuple[int, int], pad_value: int = 114
) -> tuple[npt.NDArray[np.uint8], LetterboxInfo]:
    """Resize keeping the aspect ratio and centre into ``out_hw`` (height, width), padding with ``pad_value``.

    Ultralytics semantics, so boxes line up with training: ``new_unpad = round(w*r), round(h*r)``, padding split as
    ``top = round(dh - 0.1)``, ``left = round(dw - 0.1)``; bilinear resize, skipped when the size is unchanged.
    Upscaling is allowed.
    """
    src_h, src_w = image.shape[:2]
    r, new_w, new_h, top, bottom, left, right = letterbox_geometry((src_h, src_w), out_hw)
    if (new_w, new_h) != (src_w, src_h):
        image = np.asarray(cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR), dtype=np.uint8)
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


def to_input(images: Sequence[npt.NDArray[np.uint8]], spec: InputSpec) -> npt.NDArray[Any]:
    """Letterboxed ``(H, W, 3)`` RGB uint8 images -> the network input: ``(B, 3, H, W)`` float32, normalised, or the
    pixels as ``(B, H, W, 3)`` uint8 when the bundle's graph normalises them (``spec.pixels_in_graph``)."""
    if not images:
        raise ValueError("to_input needs at least one image")
    expected = (spec.height, spec.width, 3)
    for i, im in enumerate(images):
        if im.shape != expected:
            raise ValueError(f"image {i} has shape {im.shape}, expected {expected} (letterbox it first)")
    if spec.pixels_in_graph:
        return np.stack(images).astype(np.uint8, copy=False)
    x = np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2), dtype=np.float32)
    return _normalise(x, spec, channel_axis=1)


def input_dtype(spec: InputSpec) -> type[np.uint8] | type[np.float32]:
    """The numpy type of the rows the service builds: uint8 pixels for a graph that normalises them, else float32
    (a float16 model is fed float32, cast by its backend)."""
    return np.uint8 if spec.pixels_in_graph else np.float32


def new_batch(spec: InputSpec, size: int) -> npt.NDArray[Any]:
    """An uninitialised batch of ``size`` model inputs, each ``spec.sample_shape`` of :func:`input_dtype`."""
    return np.empty((size, *spec.sample_shape), input_dtype(spec))


@functools.lru_cache(maxsize=64)
def _affine(spec: InputSpec) -> tuple[float, npt.NDArray[np.float32], npt.NDArray[np.float32], bool, npt.NDArray[Any]]:
    """Per bundle input: (scale rounded to float32, mean, std, whether mean 0 and std 1, the normalised pad value per
    channel), computed with the float32 operations of :func:`_normalise`."""
    scale = float(np.float32(spec.scale))
    mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    pad = (np.float32(spec.pad_value) * np.float32(scale) - mean) / std
    return scale, mean, std, not mean.any() and bool((std == 1.0).all()), pad


def pad_batch(spec: InputSpec, size: int) -> npt.NDArray[Any]:
    """A batch of ``size`` model inputs that are all letterbox pad (what an empty image becomes): the pad value as
    pixels, or normalised as :func:`fill_input` pads a float row."""
    x = new_batch(spec, size)
    x[:] = spec.pad_value if spec.pixels_in_graph else _affine(spec)[4].reshape(3, 1, 1)
    return x


Window = tuple[int, int, int, int]  # (x0, y0, x1, y1) in original frame pixels, half-open


def _window_geometry(
    frame: Frame, window: Window, out_hw: tuple[int, int]
) -> tuple[tuple[int, int, int, int], tuple[float, int, int, int, int, int, int]]:
    red = frame.reduction
    x0, y0, x1, y1 = window
    if red == 1.0:
        px = (x0, y0, x1, y1)
    else:  # a reduced decode: the window in the decoded pixel grid
        ph, pw = frame.pixels.shape[:2]
        px = (min(round(x0 * red), pw - 1), min(round(y0 * red), ph - 1), min(max(round(x1 * red), 1), pw),
              min(max(round(y1 * red), 1), ph))  # fmt: skip
    return px, letterbox_geometry((px[3] - px[1], px[2] - px[0]), out_hw)


def window_info(frame: Frame, window: Window, out_hw: tuple[int, int]) -> LetterboxInfo:
    """The :class:`LetterboxInfo` of letterboxing ``window`` of ``frame`` into ``out_hw`` (what :func:`fill_input`
    does), mapping model-input pixels back to frame pixels."""
    _, (r, _, _, top, _, left, _) = _window_geometry(frame, window, out_hw)
    x0, y0, x1, y1 = window
    return LetterboxInfo(
        scale=r * frame.reduction, pad_x=float(left), pad_y=float(top), src_width=x1 - x0, src_height=y1 - y0,
        offset_x=x0, offset_y=y0,
    )  # fmt: skip


_SOURCE_CHANNEL = {"bgr": (2, 1, 0), "rgb": (0, 1, 2)}  # model input channel (RGB) -> frame channel
_TO_RGB = {"gray": cv2.COLOR_GRAY2RGB, "bgr": cv2.COLOR_BGR2RGB}


def _fill_pixels(out: npt.NDArray[np.uint8], crop: npt.NDArray[np.uint8], order: str, top: int, left: int) -> None:
    """A uint8 ``(H, W, 3)`` row: the letterboxed ``crop`` as RGB at ``(top, left)`` (the pad is already there).

    OpenCV converts straight into the row when the crop fills it (a row of a C-contiguous batch is contiguous), else
    into a scratch array copied into the padded row; numpy's broadcast or reversed-channel copies measured ~50-100x
    slower per 256x256 row."""
    h, w = crop.shape[:2]
    if order == "rgb":
        out[top : top + h, left : left + w] = crop
        return
    dst = out if (h, w) == out.shape[:2] and out.flags.c_contiguous else None
    rgb = cv2.cvtColor(crop, _TO_RGB[order], dst=dst)
    if rgb is not dst:  # no row to write into, or OpenCV could not write it in place
        out[top : top + h, left : left + w] = rgb


def fill_input(out: npt.NDArray[Any], frame: Frame, window: Window, spec: InputSpec) -> None:
    """Letterbox ``window`` of ``frame`` straight into ``out``, one row of a batch: ``(3, H, W)`` float32, or
    ``(H, W, 3)`` uint8 RGB for a bundle whose graph normalises its input (``spec.pixels_in_graph``).

    The same pixels as ``to_input([letterbox(frame_to_rgb(frame)[window])], spec)[0]``: one resize of the window (none
    when it already has the input size), then each channel written once (float rows converted and normalised in
    place); a grey frame becomes three equal channels only here.
    """
    out_hw = (spec.height, spec.width)
    (px0, py0, px1, py1), (_, new_w, new_h, top, _, left, _) = _window_geometry(frame, window, out_hw)
    crop = frame.pixels[py0:py1, px0:px1]
    if (new_w, new_h) != (px1 - px0, py1 - py0):
        crop = np.asarray(cv2.resize(crop, (new_w, new_h), interpolation=cv2.INTER_LINEAR), dtype=np.uint8)
    if not spec.pixels_in_graph:
        _fill_float(out, crop, frame.order, top, left, spec)  # pads with the normalised pad value itself
        return
    if (new_w, new_h) != (spec.width, spec.height):
        out[...] = spec.pad_value
    _fill_pixels(out, crop, frame.order, top, left)


def _fill_float(
    out: npt.NDArray[np.float32], crop: npt.NDArray[np.uint8], order: str, top: int, left: int, spec: InputSpec
) -> None:
    """A float32 ``(3, H, W)`` row: each channel of the letterboxed ``crop`` converted and scaled in one OpenCV pass
    straight into its place, normalised there, the pad filled with the normalised pad value; the same float32
    operations as :func:`_normalise`, so the same bits (the scale is passed rounded to float32: 8-bit x 24-bit
    mantissas multiply exactly in double, so OpenCV's one rounding matches numpy's float32 product). Less CPU than
    converting, then normalising the whole row (docs/measurements.md, M12)."""
    h, w = crop.shape[:2]
    scale, mean, std, plain, pad = _affine(spec)
    if (h, w) != out.shape[1:]:
        out[...] = pad[:, None, None]
    region = out[:, top : top + h, left : left + w]
    planes = (crop,) if order == "gray" else cv2.split(crop)  # contiguous planes: OpenCV's fast path
    for c, src in enumerate(planes if order == "gray" else [planes[k] for k in _SOURCE_CHANNEL[order]]):
        dst = region[c]
        if cv2.multiply(src, 1.0, dst=dst, scale=scale, dtype=cv2.CV_32F) is not dst:
            np.multiply(src, np.float32(scale), out=dst, casting="unsafe")  # OpenCV could not write the view
    if order == "gray":
        region[1:] = region[0]  # three equal channels of the scaled grey, before each is normalised
    if not plain:
        region -= mean[:, None, None]
        region /= std[:, None, None]
