"""Synthetic detection datasets for the train/ tests: shapes on textured noise, written as VOC or YOLO folders.

Other test modules import the makers directly (``from tests.train.conftest import make_voc_dataset``) or use the
``voc_dataset`` / ``yolo_dataset`` fixtures. Each class is one shape with its own grey level, so a tiny model can
learn it in a few epochs: class k draws shape ``k % 3`` (filled rectangle, filled disc, filled triangle).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

DEFAULT_CLASSES = ("rect", "disc", "triangle")
_GREY = (225, 25, 185)  # per shape kind, against a 70-150 background


def _texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Greyscale textured noise: coarse blobs + fine grain, values roughly 70-150 (steel-like)."""
    coarse = rng.uniform(80, 140, size=(max(2, height // 8), max(2, width // 8))).astype(np.float32)
    base = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(base + rng.normal(0, 8, size=(height, width)), 0, 255).astype(np.uint8)


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def draw_sample(
    rng: np.random.Generator,
    width: int,
    height: int,
    nc: int,
    max_objects: int = 3,
    first_class: int | None = None,
    box_px: tuple[int, int] | None = None,
) -> tuple[np.ndarray, list[list[int]], list[int]]:
    """One RGB uint8 image (grey content in 3 channels, like NEU-DET) and its 0-based xyxy integer boxes.

    ``first_class`` forces the class of the first object (the makers use it so every class appears early).
    ``box_px`` = ``(lo, hi)`` draws box sides in ``[lo, hi]`` pixels; None keeps the default range
    ``[short/6, short/2)`` (and the default random stream, so existing datasets stay byte-identical).
    """
    grey = _texture(rng, width, height)
    boxes: list[list[int]] = []
    classes: list[int] = []
    short = min(width, height)
    n_objects = int(rng.integers(1, max_objects + 1))
    for _ in range(20 * max_objects):
        if len(boxes) == n_objects:
            break
        lo, hi = (max(6, short // 6), max(8, short // 2)) if box_px is None else (box_px[0], box_px[1] + 1)
        bw, bh = (int(v) for v in rng.integers(lo, hi, size=2))
        x1, y1 = int(rng.integers(0, width - bw + 1)), int(rng.integers(0, height - bh + 1))
        box = [x1, y1, x1 + bw, y1 + bh]
        if any(_iou(box, b) > 0.05 for b in boxes):
            continue
        cls = int(rng.integers(0, nc))
        if not boxes and first_class is not None:
            cls = first_class
        kind, grey_level = cls % 3, _GREY[cls % 3]
        if kind == 0:
            cv2.rectangle(grey, (x1, y1), (x1 + bw - 1, y1 + bh - 1), grey_level, thickness=-1)
        elif kind == 1:
            cv2.ellipse(grey, (x1 + bw // 2, y1 + bh // 2), (bw // 2, bh // 2), 0, 0, 360, grey_level, thickness=-1)
        else:
            pts = np.array([[x1, y1 + bh - 1], [x1 + bw - 1, y1 + bh - 1], [x1 + bw // 2, y1]], dtype=np.int32)
            cv2.fillPoly(grey, [pts], grey_level)
        boxes.append(box)
        classes.append(cls)
    return np.repeat(grey[:, :, None], 3, axis=2), boxes, classes


def _size_wh(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _voc_xml(stem: str, width: int, height: int, boxes: list[list[int]], names: list[str]) -> str:
    objects = "".join(
        f"\t<object>\n\t\t<name>{n}</name>\n\t\t<difficult>0</difficult>\n\t\t<bndbox>\n"
        f"\t\t\t<xmin>{b[0] + 1}</xmin>\n\t\t\t<ymin>{b[1] + 1}</ymin>\n"  # VOC is 1-based: xmin = x1 + 1, ...
        f"\t\t\t<xmax>{b[2] + 1}</xmax>\n\t\t\t<ymax>{b[3] + 1}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        for b, n in zip(boxes, names, strict=True)
    )
    return (
        f"<annotation>\n\t<filename>{stem}.jpg</filename>\n\t<size>\n\t\t<width>{width}</width>\n"
        f"\t\t<height>{height}</height>\n\t\t<depth>1</depth>\n\t</size>\n{objects}</annotation>\n"
    )


def make_voc_dataset(
    root: Path,
    n_train: int,
    n_val: int,
    *,
    size: int | tuple[int, int] = 64,
    classes: Sequence[str] = DEFAULT_CLASSES,
    seed: int = 0,
    max_objects: int = 3,
    box_px: tuple[int, int] | None = None,
) -> Path:
    """Write a NEU-DET-style VOC folder (``IMAGES/*.jpg``, ``ANNOTATIONS/*.xml``, ``splits/{train,val}.txt``).

    ``size`` is the image side or ``(width, height)``. Every class appears at least once when there are enough
    images (the first object of image i has class i % nc for the first 2 nc images). ``box_px`` as in
    :func:`draw_sample` (e.g. one class, one object of 20-30 px per image: a task a few epochs can learn).
    Returns ``root``.
    """
    width, height = _size_wh(size)
    rng = np.random.default_rng(seed)
    for sub in ("IMAGES", "ANNOTATIONS", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    names: dict[str, list[str]] = {"train": [], "val": []}
    for i in range(n_train + n_val):
        first = i % len(classes) if i < 2 * len(classes) else None
        image, boxes, ids = draw_sample(rng, width, height, len(classes), max_objects, first, box_px)
        stem = f"img_{i:04d}"
        cv2.imwrite(str(root / "IMAGES" / f"{stem}.jpg"), image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        (root / "ANNOTATIONS" / f"{stem}.xml").write_text(
            _voc_xml(stem, width, height, boxes, [classes[c] for c in ids]), encoding="utf-8"
        )
        names["train" if i < n_train else "val"].append(f"{stem}.jpg")
    for split, files in names.items():
        (root / "splits" / f"{split}.txt").write_text("".join(f"{f}\n" for f in files), encoding="utf-8")
    return root


def make_yolo_dataset(
    root: Path,
    n_train: int,
    n_val: int,
    *,
    size: int | tuple[int, int] = 64,
    classes: Sequence[str] = DEFAULT_CLASSES,
    seed: int = 0,
    max_objects: int = 3,
    names_as_dict: bool = False,
    box_px: tuple[int, int] | None = None,
) -> Path:
    """Write an Ultralytics-style dataset (``data.yaml``, ``images/{train,val}/*.png``, ``labels/{train,val}/*.txt``
    with normalised ``class cx cy w h``). ``box_px`` as in :func:`draw_sample`. Returns ``root`` (the folder holding
    ``data.yaml``)."""
    width, height = _size_wh(size)
    rng = np.random.default_rng(seed)
    for i in range(n_train + n_val):
        split = "train" if i < n_train else "val"
        first = i % len(classes) if i < 2 * len(classes) else None
        image, boxes, ids = draw_sample(rng, width, height, len(classes), max_objects, first, box_px)
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "images" / split / f"img_{i:04d}.png"), image[:, :, ::-1])
        lines = [
            f"{c} {(b[0] + b[2]) / 2 / width:.6f} {(b[1] + b[3]) / 2 / height:.6f} "
            f"{(b[2] - b[0]) / width:.6f} {(b[3] - b[1]) / height:.6f}\n"
            for b, c in zip(boxes, ids, strict=True)
        ]
        (root / "labels" / split / f"img_{i:04d}.txt").write_text("".join(lines), encoding="utf-8")
    names: list[str] | dict[int, str] = dict(enumerate(classes)) if names_as_dict else list(classes)
    config = {"path": ".", "train": "images/train", "val": "images/val", "names": names}
    (root / "data.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return root


@pytest.fixture
def voc_dataset(tmp_path: Path) -> Path:
    """A 12-train / 6-val VOC folder of 64x64 images with 3 classes."""
    return make_voc_dataset(tmp_path / "voc", 12, 6)


@pytest.fixture
def yolo_dataset(tmp_path: Path) -> Path:
    """A 12-train / 6-val YOLO dataset of 64x64 images with 3 classes."""
    return make_yolo_dataset(tmp_path / "yolo", 12, 6)
