"""train/augment.py: eval view = service letterbox, determinism per (seed, epoch, index), box geometry under
mosaic/affine/flips, image-weighted mosaic partners, and collate."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from service.core.preprocess import letterbox
from tests.train.conftest import make_voc_dataset
from train.augment import AugmentConfig, DetectionDataset, augment_hsv, collate
from train.dataset import DatasetError, DatasetSplit, ImageRecord, load_split, read_image

_NO_AUG = AugmentConfig(mosaic=0.0, translate=0.0, scale=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, fliplr=0.0, flipud=0.0)


def _bright_box_split(tmp_path: Path, n: int, size: tuple[int, int] = (90, 60)) -> DatasetSplit:
    """Black images, one white rectangle each; image i's box has class i (so the class names the source image)."""
    rng = np.random.default_rng(3)
    records = []
    w, h = size
    for i in range(n):
        bw, bh = int(rng.integers(12, 30)), int(rng.integers(12, 30))
        x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        image = np.zeros((h, w, 3), np.uint8)
        image[y1 : y1 + bh, x1 : x1 + bw] = 255
        path = tmp_path / f"b{i}.png"
        cv2.imwrite(str(path), image)
        boxes = np.array([[x1, y1, x1 + bw, y1 + bh]], np.float32)
        records.append(ImageRecord(path, w, h, boxes, np.array([i], np.int64), path.stem))
    return DatasetSplit([f"c{i}" for i in range(n)], records, tmp_path, "train")


def test_eval_view_is_the_service_letterbox(tmp_path: Path) -> None:
    split = load_split(make_voc_dataset(tmp_path / "v", 3, 1, size=(80, 48)), "train")
    ds = DetectionDataset(split, 64, augment=False)
    image, labels = ds[1]
    record = split.records[1]
    expected, info = letterbox(read_image(record.path), (64, 64))
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected)
    boxes = record.boxes_xyxy * info.scale + np.array([info.pad_x, info.pad_y] * 2)
    np.testing.assert_allclose(labels[:, 1:].numpy(), boxes, rtol=1e-6)
    np.testing.assert_array_equal(labels[:, 0].numpy(), record.class_ids)


def test_augmentation_is_deterministic_per_seed_epoch_index(voc_dataset: Path) -> None:
    split = load_split(voc_dataset, "train")
    ds = DetectionDataset(split, 64, augment=True, seed=7)
    first = [ds[i] for i in range(4)]
    again = DetectionDataset(split, 64, augment=True, seed=7)
    for (a_img, a_lab), (b_img, b_lab) in zip(first, [again[i] for i in range(4)], strict=True):
        assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    ds.set_epoch(1)
    assert not all(torch.equal(a[0], ds[i][0]) for i, a in enumerate(first))
    ds.set_epoch(0)
    assert torch.equal(ds[2][0], first[2][0])  # going back to an epoch reproduces it (resume)


def test_boxes_follow_the_pixels_under_mosaic_affine_and_flips(tmp_path: Path) -> None:
    split = _bright_box_split(tmp_path, 6)
    hyp = AugmentConfig(hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, degrees=0.0, translate=0.2, scale=0.5)
    ds = DetectionDataset(split, 64, augment=True, hyp=hyp, seed=0)
    checked = 0
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            image, labels = ds[i]
            grey = image[0].numpy().astype(np.float32)
            inside = np.zeros_like(grey, dtype=bool)
            for _, x1, y1, x2, y2 in labels.numpy():
                assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
                core = grey[int(np.ceil(y1)) + 1 : int(y2) - 1, int(np.ceil(x1)) + 1 : int(x2) - 1]
                if core.size:
                    assert core.min() > 200  # the box holds the white rectangle
                inside[max(int(y1) - 1, 0) : int(np.ceil(y2)) + 1, max(int(x1) - 1, 0) : int(np.ceil(x2)) + 1] = True
                checked += 1
            assert (grey[~inside] < 200).all()  # and no white pixel is left without a box
    assert checked > 20


def test_flips_only(tmp_path: Path) -> None:
    split = _bright_box_split(tmp_path, 1, size=(64, 64))
    hyp = AugmentConfig(**{**_NO_AUG.__dict__, "fliplr": 1.0, "flipud": 1.0})
    image, labels = DetectionDataset(split, 64, augment=True, hyp=hyp)[0]
    plain, plain_labels = DetectionDataset(split, 64, augment=False)[0]
    assert torch.equal(image, plain.flip(1).flip(2))
    x1, y1, x2, y2 = plain_labels[0, 1:].tolist()
    np.testing.assert_allclose(labels[0, 1:].numpy(), [64 - x2, 64 - y2, 64 - x1, 64 - y1], atol=1e-4)


def test_image_weights_choose_the_mosaic_partners(tmp_path: Path) -> None:
    split = _bright_box_split(tmp_path, 6)
    hyp = AugmentConfig(scale=0.0, translate=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0)
    ds = DetectionDataset(split, 64, augment=True, hyp=hyp, seed=1)
    ds.set_image_weights([0, 0, 0, 0, 0, 1])
    seen: set[int] = set()
    for i in range(5):
        classes = {int(c) for c in ds[i][1][:, 0]}
        assert classes <= {i, 5}  # the 3 extra tiles all come from image 5
        seen |= classes
    assert 5 in seen
    ds.set_image_weights(None)
    with pytest.raises(ValueError, match="image weights"):
        ds.set_image_weights([1.0, 2.0])
    with pytest.raises(ValueError, match="image weights"):
        ds.set_image_weights([0, 0, 0, 0, 0, -1])


def test_mosaic_switch_off_gives_single_images(tmp_path: Path) -> None:
    split = _bright_box_split(tmp_path, 6)
    hyp = AugmentConfig(hsv_h=0.0, hsv_s=0.0, hsv_v=0.0)
    ds = DetectionDataset(split, 64, augment=True, hyp=hyp, seed=2)
    ds.mosaic = False
    for i in range(len(ds)):
        assert {int(c) for c in ds[i][1][:, 0]} <= {i}


def test_hsv_keeps_grey_images_grey_and_changes_brightness() -> None:
    grey = np.repeat(np.linspace(20, 230, 64 * 64).reshape(64, 64, 1), 3, axis=2).astype(np.uint8)
    out = augment_hsv(grey, AugmentConfig(), np.random.default_rng(4))
    assert out.shape == grey.shape and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert not np.array_equal(out, grey)


def test_collate_adds_batch_index(voc_dataset: Path) -> None:
    ds = DetectionDataset(load_split(voc_dataset, "train"), 64, augment=False)
    batch = [ds[i] for i in range(3)]
    images, targets = collate(batch)
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.uint8
    assert targets.shape == (sum(len(lab) for _, lab in batch), 6) and targets.dtype == torch.float32
    np.testing.assert_array_equal(targets[:, 0].numpy(), np.repeat(np.arange(3), [len(lab) for _, lab in batch]))
    torch.testing.assert_close(targets[:, 1:], torch.cat([lab for _, lab in batch]))


def test_bad_settings_and_size_mismatch(tmp_path: Path, voc_dataset: Path) -> None:
    split = load_split(voc_dataset, "train")
    with pytest.raises(ValueError, match="multiple of 32"):
        DetectionDataset(split, 50, augment=False)
    with pytest.raises(ValueError, match="probability"):
        AugmentConfig(fliplr=2.0)
    record = split.records[0]
    bad_record = ImageRecord(record.path, 99, 64, record.boxes_xyxy, record.class_ids, "x")
    wrong = DatasetSplit(split.class_names, [bad_record], tmp_path, "t")
    with pytest.raises(DatasetError, match="annotation says 99x64"):
        DetectionDataset(wrong, 64, augment=False)[0]
