"""The image archive next to the records: which images are kept, where their files go, how they are written so that
they survive a crash (file and directory fsync), and the annotated copy with the detections drawn.

Layout under ``data_dir``: ``images/YYYY/MM/DD/<sha256>.<ext>`` (the bytes as uploaded; the same bytes are one file)
and ``annotated/YYYY/MM/DD/<request_id>_<index>.jpg``; the day is the UTC day the image was received.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from service.settings import ArchiveSettings

__all__ = [
    "MEDIA_TYPES",
    "annotated_rel_path",
    "draw_annotated",
    "fsync_dirs",
    "image_extension",
    "image_rel_path",
    "keep_image",
    "write_file",
]

MEDIA_TYPES = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "bmp": "image/bmp",
    "tif": "image/tiff",
    "bin": "application/octet-stream",
}
_MAGIC = (
    (b"\xff\xd8\xff", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"BM", "bmp"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def keep_image(verdict: str, settings: ArchiveSettings, rng: random.Random) -> bool:
    """NG images when ``settings.ng``; OK images with probability ``ok_sample_rate`` (0 never, 1 always)."""
    if verdict == "NG":
        return settings.ng
    return settings.ok_sample_rate > 0.0 and rng.random() < settings.ok_sample_rate


def image_extension(data: bytes) -> str:
    """``jpg``/``png``/``bmp``/``tif`` from the magic bytes, ``bin`` for anything else (kept, but not served as an
    image type)."""
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), "bin")


def _day(received_at: float) -> str:
    return time.strftime("%Y/%m/%d", time.gmtime(received_at))


def image_rel_path(sha256: str, ext: str, received_at: float) -> str:
    """``images/YYYY/MM/DD/<sha256>.<ext>``, relative to ``data_dir`` (POSIX separators, as stored)."""
    return f"images/{_day(received_at)}/{sha256}.{ext}"


def annotated_rel_path(request_id: str, index: int, received_at: float, attempt: int = 0) -> str:
    """``annotated/YYYY/MM/DD/<request_id>_<index>.jpg``. Request ids come from clients: characters outside
    ``[A-Za-z0-9._-]`` become ``_`` and the id is cut to 96 characters, so a path can never leave the folder.
    ``attempt`` > 0 adds ``-<attempt>`` for a request id used twice."""
    safe = _UNSAFE.sub("_", request_id)[:96].lstrip(".") or "_"
    suffix = f"-{attempt}" if attempt else ""
    return f"annotated/{_day(received_at)}/{safe}_{index}{suffix}.jpg"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(path: Path, created: set[Path]) -> None:
    """``mkdir -p``, remembering every directory it created so its parent's entry can be fsynced too."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        created.add(d)


def write_file(root: Path, rel: str, data: bytes, dirty_dirs: set[Path], *, sync: bool = True) -> None:
    """Write ``data`` to ``root/rel`` through a temporary file in the same folder, fsync it (``sync``) and rename it
    into place (a crash leaves the old file or the new one, never half of one). The folders whose entries changed are
    added to ``dirty_dirs``: the caller fsyncs them once per group (:func:`fsync_dirs`) before committing the records.
    Without ``sync`` (fast records) the page cache writes it: a killed process loses nothing written, the machine's
    power loss may lose the last seconds, as it may the records of that mode."""
    final = root / rel
    created: set[Path] = set()
    _make_dirs(final.parent, created)
    tmp = final.with_name(f".{final.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    dirty_dirs.add(final.parent)
    dirty_dirs.update(d.parent for d in created)


def fsync_dirs(dirs: Iterable[Path]) -> None:
    """fsync each folder, deepest first, so new entries (files, then the folders holding them) are on disk."""
    for d in sorted(set(dirs), key=lambda p: len(p.parts), reverse=True):
        _fsync_dir(d)


def draw_annotated(data: bytes, detections: Sequence[Mapping[str, Any]]) -> bytes | None:
    """A JPEG (quality 90) of the image with each detection's box and ``class score`` drawn; None when OpenCV cannot
    decode the bytes (the original is still archived). Boxes are in original-image pixels."""
    import cv2
    import numpy as np

    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        return None
    thickness = max(1, round(max(image.shape[:2]) / 400))
    for det in detections:
        x1, y1, x2, y2 = (round(float(v)) for v in det["box_xyxy"])
        colour = _colour(int(det["class_id"]))
        cv2.rectangle(image, (x1, y1), (x2, y2), colour, thickness)
        label = f"{det['class_name']} {float(det['score']):.2f}"
        cv2.putText(image, label, (x1, max(y1 - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thickness, colour, thickness)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return bytes(encoded) if ok else None


def _colour(class_id: int) -> tuple[int, int, int]:
    """A fixed, distinct BGR colour per class id (golden-ratio hue steps)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((class_id * 0.618034) % 1.0, 0.9, 1.0)
    return int(b * 255), int(g * 255), int(r * 255)
