"""Training-time augmentation and the torch Dataset the trainer iterates: mosaic, random affine, HSV, flips, letterbox.

The recipe and its defaults follow Ultralytics YOLO11 (``docs/data-and-evaluation.md`` lists them; facts from
``docs/models.md``, design note D4; our own code). The letterbox is ``service.core.preprocess.letterbox``, so
training, evaluation and serving see the same pixels. Randomness is a pure function of ``(seed, epoch, index)``: the
same sample comes out in any DataLoader worker and after a resume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset

from service.core.preprocess import letterbox
from train.dataset import DatasetError, DatasetSplit, read_image

__all__ = ["AugmentConfig", "DetectionDataset", "collate"]

_Image = npt.NDArray[np.uint8]
_Boxes = npt.NDArray[np.float32]


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation hyper-parameters (Ultralytics names and defaults, except ``flipud``).

    ``flipud`` is 0.5 rather than Ultralytics' 0.0: surface defects (NEU-DET steel, PCB, textile) have no "up", so a
    vertical flip is as label-preserving as a horizontal one. Set it to 0 for data with a natural orientation.
    """

    mosaic: float = 1.0  # probability of a 4-image mosaic (DetectionDataset.mosaic switches it off entirely)
    degrees: float = 0.0  # rotation range, +- degrees
    translate: float = 0.1  # translation, fraction of the output size
    scale: float = 0.5  # scale gain range 1 +- scale
    shear: float = 0.0  # shear range, +- degrees
    hsv_h: float = 0.015  # hue gain (fraction)
    hsv_s: float = 0.7  # saturation gain (fraction)
    hsv_v: float = 0.4  # value (brightness) gain (fraction)
    fliplr: float = 0.5  # probability of a horizontal flip
    flipud: float = 0.5  # probability of a vertical flip
    min_box_px: float = 2.0  # boxes narrower or lower than this after augmentation are dropped
    min_area_ratio: float = 0.1  # ... or keeping less than this fraction of their (scaled) area
    max_aspect: float = 100.0  # ... or more elongated than this
    pad_value: int = 114  # letterbox / mosaic / affine border grey, as in the served bundle

    def __post_init__(self) -> None:
        for name in ("mosaic", "fliplr", "flipud"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"AugmentConfig.{name} is a probability, got {getattr(self, name)}")
        if not 0.0 <= self.scale < 1.0:
            raise ValueError(f"AugmentConfig.scale must be in [0, 1), got {self.scale}")
        if not 0.0 <= self.translate <= 0.5:
            raise ValueError(f"AugmentConfig.translate must be in [0, 0.5], got {self.translate}")


class DetectionDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Images of a :class:`DatasetSplit` as fixed-size ``S x S`` network inputs with their boxes.

    ``augment=False`` gives the evaluation view: the service's letterbox of the original image, nothing else.
    ``augment=True``: mosaic (probability ``hyp.mosaic`` while :attr:`mosaic` is on) or letterbox, then random
    affine, HSV and flips. Call :meth:`set_epoch` before each epoch: randomness is seeded by ``(seed, epoch, index)``.
    With ``persistent_workers=True`` a DataLoader keeps stale copies of the dataset, so leave it off (the default).
    """

    def __init__(
        self,
        split: DatasetSplit,
        imgsz: int,
        *,
        augment: bool,
        hyp: AugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        if imgsz <= 0 or imgsz % 32:
            raise ValueError(f"imgsz must be a positive multiple of 32, got {imgsz}")
        if not split.records:
            raise DatasetError(split.root, f"split '{split.split}' has no images")
        self.split = split
        self.imgsz = imgsz
        self.augment = augment
        self.hyp = hyp or AugmentConfig()
        self.seed = seed
        self.mosaic = augment and self.hyp.mosaic > 0
        self.epoch = 0
        self._image_p: npt.NDArray[np.float64] | None = None

    def __len__(self) -> int:
        return len(self.split.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_image_weights(self, weights: Sequence[float] | npt.NDArray[np.floating] | None) -> None:
        """Sampling weights ``(N,)`` for the 3 extra mosaic images (DS-CBSM++); None restores uniform sampling."""
        if weights is None:
            self._image_p = None
            return
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.shape[0] != len(self) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"image weights must be {len(self)} finite non-negative numbers with a positive sum")
        self._image_p = w / w.sum()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(image (3, S, S) uint8 RGB, labels (n, 5) float32 [class_id, x1, y1, x2, y2] in S x S px)``."""
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if not self.augment:
            image, boxes, classes = self._letterboxed(index)
        else:
            if self.mosaic and rng.random() < self.hyp.mosaic:
                image, boxes, classes = self._mosaic(index, rng)  # 2S x 2S, cropped back to S x S by the affine
            else:
                image, boxes, classes = self._letterboxed(index)
            image, boxes, classes = random_affine(image, boxes, classes, self.imgsz, self.hyp, rng)
            image = augment_hsv(image, self.hyp, rng)
            image, boxes = random_flips(image, boxes, self.hyp, rng)
        labels = np.concatenate([classes[:, None].astype(np.float32), boxes], axis=1)
        chw = np.ascontiguousarray(image.transpose(2, 0, 1))
        return torch.from_numpy(chw), torch.from_numpy(labels)

    def _load(self, index: int) -> tuple[_Image, _Boxes, npt.NDArray[np.int64]]:
        record = self.split.records[index]
        image = read_image(record.path)
        if image.shape[:2] != (record.height, record.width):
            h, w = image.shape[:2]
            raise DatasetError(record.path, f"image is {w}x{h} but its annotation says {record.width}x{record.height}")
        return image, record.boxes_xyxy.copy(), record.class_ids.copy()

    def _letterboxed(self, index: int) -> tuple[_Image, _Boxes, npt.NDArray[np.int64]]:
        image, boxes, classes = self._load(index)
        image, info = letterbox(image, (self.imgsz, self.imgsz), self.hyp.pad_value)
        boxes = boxes * np.float32(info.scale) + np.array([info.pad_x, info.pad_y] * 2, dtype=np.float32)
        return image, boxes.astype(np.float32), classes

    def _mosaic(self, index: int, rng: np.random.Generator) -> tuple[_Image, _Boxes, npt.NDArray[np.int64]]:
        """Four images around a random centre on a 2S x 2S canvas (Ultralytics mosaic4 geometry)."""
        s = self.imgsz
        if self._image_p is None:
            others = rng.integers(0, len(self), size=3)
        else:
            others = rng.choice(len(self), size=3, p=self._image_p)
        xc, yc = (int(v) for v in rng.uniform(s // 2, 2 * s - s // 2, size=2))
        canvas = np.full((2 * s, 2 * s, 3), self.hyp.pad_value, dtype=np.uint8)
        all_boxes, all_classes = [], []
        for k, i in enumerate([index, *others.tolist()]):
            image, boxes, classes = self._load(int(i))
            h0, w0 = image.shape[:2]
            r = s / max(h0, w0)
            if r != 1:
                interp = cv2.INTER_LINEAR if r > 1 else cv2.INTER_AREA
                size = (max(1, round(w0 * r)), max(1, round(h0 * r)))
                image = np.asarray(cv2.resize(image, size, interpolation=interp), dtype=np.uint8)
            h, w = image.shape[:2]
            boxes = boxes * np.array([w / w0, h / h0] * 2, dtype=np.float32)
            # (x1a, y1a, x2a, y2a): where the tile lands on the canvas; (x1b, y1b): its top-left inside the image.
            x1a, x2a = (max(xc - w, 0), xc) if k in (0, 2) else (xc, min(xc + w, 2 * s))
            y1a, y2a = (max(yc - h, 0), yc) if k in (0, 1) else (yc, min(yc + h, 2 * s))
            x1b = w - (x2a - x1a) if k in (0, 2) else 0
            y1b = h - (y2a - y1a) if k in (0, 1) else 0
            canvas[y1a:y2a, x1a:x2a] = image[y1b : y1b + (y2a - y1a), x1b : x1b + (x2a - x1a)]
            all_boxes.append(boxes + np.array([x1a - x1b, y1a - y1b] * 2, dtype=np.float32))
            all_classes.append(classes)
        boxes = np.concatenate(all_boxes).clip(0, 2 * s).astype(np.float32)
        return canvas, boxes, np.concatenate(all_classes)


def random_affine(
    image: _Image,
    boxes: _Boxes,
    classes: npt.NDArray[np.int64],
    out_size: int,
    hyp: AugmentConfig,
    rng: np.random.Generator,
) -> tuple[_Image, _Boxes, npt.NDArray[np.int64]]:
    """Random rotation/scale/shear about the input's centre, which then lands at ``out_size * (0.5 +- translate)``.

    The output is ``out_size`` square whatever the input size (a 2S mosaic canvas is cropped to S). Boxes become the
    hull of their transformed corners, clipped, then filtered (too small, too elongated, or mostly cropped away).
    """
    h, w = image.shape[:2]
    centre = np.eye(3)
    centre[:2, 2] = -w / 2, -h / 2
    rot = np.eye(3)
    angle, gain = rng.uniform(-hyp.degrees, hyp.degrees), rng.uniform(1 - hyp.scale, 1 + hyp.scale)
    rot[:2] = cv2.getRotationMatrix2D(center=(0, 0), angle=angle, scale=gain)
    shear = np.eye(3)
    shear[0, 1], shear[1, 0] = (math.tan(math.radians(v)) for v in rng.uniform(-hyp.shear, hyp.shear, size=2))
    shift = np.eye(3)
    shift[:2, 2] = rng.uniform(0.5 - hyp.translate, 0.5 + hyp.translate, size=2) * out_size
    matrix = shift @ shear @ rot @ centre
    pad = (hyp.pad_value,) * 3
    image = np.asarray(cv2.warpAffine(image, matrix[:2], dsize=(out_size, out_size), borderValue=pad), dtype=np.uint8)
    if len(boxes) == 0:
        return image, boxes.reshape(0, 4), classes
    corners = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(-1, 2)  # x1y1, x2y2, x1y2, x2y1 per box
    xy = np.concatenate([corners, np.ones((len(corners), 1))], axis=1) @ matrix[:2].T
    xy = xy.reshape(-1, 8)
    new = np.stack([xy[:, 0::2].min(1), xy[:, 1::2].min(1), xy[:, 0::2].max(1), xy[:, 1::2].max(1)], axis=1)
    new = new.clip(0, out_size).astype(np.float32)
    keep = _box_candidates(boxes * gain, new, hyp)
    return image, new[keep], classes[keep]


def _box_candidates(before: _Boxes, after: _Boxes, hyp: AugmentConfig) -> npt.NDArray[np.bool_]:
    eps = 1e-16
    w1, h1 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    w2, h2 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    aspect = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (
        (w2 > hyp.min_box_px)
        & (h2 > hyp.min_box_px)
        & (w2 * h2 / (w1 * h1 + eps) > hyp.min_area_ratio)
        & (aspect < hyp.max_aspect)
    )


def augment_hsv(image: _Image, hyp: AugmentConfig, rng: np.random.Generator) -> _Image:
    """Random hue/saturation/value gains through lookup tables (greyscale images only change brightness)."""
    if not (hyp.hsv_h or hyp.hsv_s or hyp.hsv_v):
        return image
    gains = rng.uniform(-1, 1, size=3) * (hyp.hsv_h, hyp.hsv_s, hyp.hsv_v) + 1
    hue, sat, val = cv2.split(cv2.cvtColor(image, cv2.COLOR_RGB2HSV))
    x = np.arange(256, dtype=np.float64)
    lut_hue = ((x * gains[0]) % 180).astype(np.uint8)
    lut_sat = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_val = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
    return np.asarray(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), dtype=np.uint8)


def random_flips(image: _Image, boxes: _Boxes, hyp: AugmentConfig, rng: np.random.Generator) -> tuple[_Image, _Boxes]:
    """Vertical flip with probability ``flipud``, then horizontal with ``fliplr`` (boxes follow)."""
    h, w = image.shape[:2]
    do_ud, do_lr = rng.random() < hyp.flipud, rng.random() < hyp.fliplr
    if do_ud:
        image = image[::-1]
        boxes = np.stack([boxes[:, 0], h - boxes[:, 3], boxes[:, 2], h - boxes[:, 1]], axis=1)
    if do_lr:
        image = image[:, ::-1]
        boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
    return np.ascontiguousarray(image), boxes.astype(np.float32).reshape(-1, 4)


def collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack samples: ``images (B, 3, S, S) uint8`` and ``targets (M, 6) float32 [batch_idx, class_id, x1, y1, x2,
    y2]`` in input pixels."""
    images = torch.stack([img for img, _ in batch])
    targets = [
        torch.cat([torch.full((len(lab), 1), float(i), dtype=torch.float32), lab], dim=1)
        for i, (_, lab) in enumerate(batch)
    ]
    return images, torch.cat(targets) if targets else torch.zeros((0, 6), dtype=torch.float32)
