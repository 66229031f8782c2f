"""Images for parity and calibration: a dataset split read with ``train.dataset``, or seeded synthetic images.

``export.runtimes`` pushes them through ``train.predict``'s evaluation loop (the service's own letterbox, then
``to_input``), so export measures exactly what the service will feed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from service.core.bundle import InputSpec
from service.core.preprocess import letterbox, to_input
from train.dataset import DatasetSplit, load_split, read_image

__all__ = ["SampleSet", "synthetic_images"]


def synthetic_images(count: int = 8, *, seed: int = 0) -> list[npt.NDArray[np.uint8]]:
    """Steel-like grey textures of varied sizes with a few dark and bright blobs and scratches (HWC RGB uint8).

    Not defects a trained model knows, but not flat noise either: they exercise letterbox padding and give an
    untrained network varied activations.
    """
    rng = np.random.default_rng(seed)
    sizes = [(200, 200), (240, 320), (320, 240), (480, 640)]
    images = []
    for i in range(count):
        h, w = sizes[i % len(sizes)]
        base = rng.normal(128, 18, size=(h, w)).astype(np.float32)
        base = np.asarray(cv2.GaussianBlur(base, (0, 0), 2.0), dtype=np.float32)
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
            cv2.circle(base, (cx, cy), int(rng.integers(4, 30)), float(rng.choice([40.0, 220.0])), -1)
            x2, y2 = int(rng.integers(0, w)), int(rng.integers(0, h))
            cv2.line(base, (cx, cy), (x2, y2), float(rng.uniform(20, 80)), int(rng.integers(1, 4)))
        gray = np.clip(base, 0, 255).astype(np.uint8)
        images.append(np.repeat(gray[:, :, None], 3, axis=2))
    return images


@dataclass
class SampleSet:
    """Images to push through every runtime, with the dataset split behind them when there is one."""

    spec: InputSpec
    source: str
    split: DatasetSplit | None = None
    images: list[npt.NDArray[np.uint8]] | None = None  # synthetic images when there is no split

    @classmethod
    def from_split(cls, data: Path, split_name: str, spec: InputSpec) -> SampleSet:
        split = load_split(data, split_name)
        if not split.records:
            raise ValueError(f"{data}: split {split_name!r} has no images")
        return cls(spec=spec, source=f"{Path(data).name} split {split_name} ({len(split.records)} images)", split=split)

    @classmethod
    def synthetic(cls, spec: InputSpec, count: int = 8, seed: int = 0) -> SampleSet:
        images = synthetic_images(count, seed=seed)
        return cls(spec=spec, source=f"synthetic ({count} seeded images, seed {seed})", images=images)

    def __len__(self) -> int:
        return len(self.split.records) if self.split is not None else len(self.images or [])

    def image(self, i: int) -> npt.NDArray[np.uint8]:
        """Image ``i`` as read (RGB uint8 HWC), before the letterbox."""
        if self.split is not None:
            return read_image(self.split.records[i].path)
        assert self.images is not None
        return self.images[i]

    def first_input(self) -> npt.NDArray[np.float32]:
        """The first image as a ``(1, 3, H, W)`` float32 network input (for timing a runtime)."""
        boxed, _ = letterbox(self.image(0), (self.spec.height, self.spec.width), self.spec.pad_value)
        return to_input([boxed], self.spec)
