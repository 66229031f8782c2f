"""train/dataset.py: VOC and YOLO readers, coordinate conventions, class names, and malformed-annotation reports."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from tests.train.conftest import make_voc_dataset, make_yolo_dataset
from train.dataset import DatasetError, load_split, read_image


def _xml_boxes(path: Path) -> tuple[list[str], np.ndarray]:
    root = ET.parse(path).getroot()
    names = [o.findtext("name") or "" for o in root.iter("object")]
    tags = ("xmin", "ymin", "xmax", "ymax")
    boxes = [[float(o.findtext(f"bndbox/{t}") or "nan") for t in tags] for o in root.iter("object")]
    return names, np.asarray(boxes)


def test_voc_split_boxes_are_zero_based_and_classes_sorted(voc_dataset: Path) -> None:
    train = load_split(voc_dataset, "train")
    val = load_split(voc_dataset, "val")
    assert (len(train.records), len(val.records)) == (12, 6)
    assert train.class_names == val.class_names == ["disc", "rect", "triangle"]  # sorted names found in the XMLs
    for record in train.records + val.records:
        names, voc = _xml_boxes(voc_dataset / "ANNOTATIONS" / f"{record.stem}.xml")
        np.testing.assert_array_equal(record.boxes_xyxy, voc - 1)  # x1 = xmin - 1, ..., x2 = xmax - 1
        assert [train.class_names[c] for c in record.class_ids] == names
        assert record.path == voc_dataset / "IMAGES" / f"{record.stem}.jpg"
        assert (record.width, record.height) == (64, 64)
        assert record.boxes_xyxy.dtype == np.float32 and record.class_ids.dtype == np.int64
    assert train.num_instances == int(train.class_counts().sum()) > 0


def test_voc_classes_txt_sets_order_and_split_entries_may_omit_extension(voc_dataset: Path) -> None:
    (voc_dataset / "classes.txt").write_text("triangle\nrect\ndisc\nunused\n", encoding="utf-8")
    stems = [line[:-4] for line in (voc_dataset / "splits" / "val.txt").read_text().split()]
    (voc_dataset / "splits" / "val.txt").write_text("\n".join(stems) + "\n", encoding="utf-8")
    val = load_split(voc_dataset, "val")
    assert val.class_names == ["triangle", "rect", "disc", "unused"]
    assert [r.stem for r in val.records] == stems
    names, _ = _xml_boxes(voc_dataset / "ANNOTATIONS" / f"{stems[0]}.xml")
    assert [val.class_names[c] for c in val.records[0].class_ids] == names


def test_voc_image_path_comes_from_xml_stem_not_filename(voc_dataset: Path) -> None:
    xml = voc_dataset / "ANNOTATIONS" / "img_0000.xml"
    xml.write_text(xml.read_text().replace("<filename>img_0000.jpg", "<filename>img_0000"), encoding="utf-8")
    train = load_split(voc_dataset, "train")
    assert train.records[0].path.name == "img_0000.jpg"


def test_voc_reports_every_malformed_file_at_once(voc_dataset: Path) -> None:
    ann = voc_dataset / "ANNOTATIONS"
    text = (ann / "img_0001.xml").read_text()
    (ann / "img_0001.xml").write_text(text.replace("<xmax>", "<xmax>-9", 1), encoding="utf-8")  # degenerate box
    (ann / "img_0002.xml").write_text("<annotation><size>", encoding="utf-8")  # invalid XML
    text = (ann / "img_0003.xml").read_text()
    (ann / "img_0003.xml").write_text(text.replace("<ymin>", "<ymin>abc", 1), encoding="utf-8")
    (ann / "img_0004.xml").unlink()
    (voc_dataset / "IMAGES" / "img_0005.jpg").unlink()
    with pytest.raises(DatasetError) as info:
        load_split(voc_dataset, "train")
    files = {p.name for p, _ in info.value.problems}
    assert files == {"img_0001.xml", "img_0002.xml", "img_0003.xml", "img_0004.xml", "img_0005.jpg"}
    message = str(info.value)
    assert "5 malformed" in message and "degenerate" in message and "invalid XML" in message
    assert "non-numeric" in message and "annotation missing" in message and "image missing" in message


def test_voc_box_outside_image_is_an_error(voc_dataset: Path) -> None:
    xml = voc_dataset / "ANNOTATIONS" / "img_0006.xml"
    xml.write_text(xml.read_text().replace("<width>64</width>", "<width>20</width>"), encoding="utf-8")
    with pytest.raises(DatasetError, match="outside the 20x64 image") as info:
        load_split(voc_dataset, "train")
    assert info.value.path == xml


def test_missing_dataset_split_and_layout_are_clear_errors(tmp_path: Path, voc_dataset: Path) -> None:
    with pytest.raises(DatasetError, match="dataset not found"):
        load_split(tmp_path / "nope", "val")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="not a dataset"):
        load_split(tmp_path / "empty", "val")
    with pytest.raises(DatasetError, match=r"split file not found \(splits here: train, val\)"):
        load_split(voc_dataset, "test")


def test_yolo_split_denormalises_labels(yolo_dataset: Path) -> None:
    train = load_split(yolo_dataset, "train")
    val = load_split(yolo_dataset / "data.yaml", "val")
    assert train.class_names == val.class_names == ["rect", "disc", "triangle"]
    assert (len(train.records), len(val.records)) == (12, 6)
    for record in train.records:
        label = yolo_dataset / "labels" / "train" / f"{record.stem}.txt"
        rows = np.loadtxt(label, ndmin=2)
        np.testing.assert_array_equal(record.class_ids, rows[:, 0].astype(np.int64))
        cx, cy, w, h = (rows[:, k] * 64 for k in range(1, 5))
        expected = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
        np.testing.assert_allclose(record.boxes_xyxy, expected, atol=1e-3)


def test_yolo_names_dict_polygon_and_missing_label(tmp_path: Path) -> None:
    root = make_yolo_dataset(tmp_path / "y", 3, 1, names_as_dict=True)
    label = root / "labels" / "train" / "img_0001.txt"
    label.write_text("2 0.25 0.25 0.75 0.25 0.5 0.75\n", encoding="utf-8")  # polygon -> its bounding box
    (root / "labels" / "train" / "img_0002.txt").unlink()  # no label file: a background image
    train = load_split(root, "train")
    assert train.class_names == ["rect", "disc", "triangle"]
    np.testing.assert_allclose(train.records[1].boxes_xyxy, [[16, 16, 48, 48]])
    assert train.records[1].class_ids.tolist() == [2]
    assert train.records[2].boxes_xyxy.shape == (0, 4)


def test_yolo_reports_every_malformed_label(yolo_dataset: Path) -> None:
    labels = yolo_dataset / "labels" / "train"
    (labels / "img_0000.txt").write_text("7 0.5 0.5 0.1 0.1\n", encoding="utf-8")
    (labels / "img_0001.txt").write_text("0 0.5 0.5 0.1\n", encoding="utf-8")
    (labels / "img_0002.txt").write_text("0 1.5 0.5 0.1 0.1\n", encoding="utf-8")
    (labels / "img_0003.txt").write_text("0 0.5 0.5 0.0 0.1\n", encoding="utf-8")
    (yolo_dataset / "images" / "train" / "img_0004.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError) as info:
        load_split(yolo_dataset, "train")
    assert {p.name for p, _ in info.value.problems} == {
        "img_0000.txt",
        "img_0001.txt",
        "img_0002.txt",
        "img_0003.txt",
        "img_0004.png",
    }
    message = str(info.value)
    assert "not in 0..2" in message and "expected 'class cx cy w h'" in message and "normalised" in message
    assert "degenerate" in message and "not a readable image" in message


def test_yolo_yaml_errors(tmp_path: Path, yolo_dataset: Path) -> None:
    config = yaml.safe_load((yolo_dataset / "data.yaml").read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**config, "names": {0: "a", 2: "b"}, "path": str(yolo_dataset)}), encoding="utf-8")
    with pytest.raises(DatasetError, match=r"'names' keys must be 0\.\.1"):
        load_split(bad, "train")
    bad.write_text(yaml.safe_dump({**config, "path": str(yolo_dataset), "val": "images/missing"}), encoding="utf-8")
    with pytest.raises(DatasetError, match="image folder or list file not found"):
        load_split(bad, "val")
    with pytest.raises(DatasetError, match="no 'test' entry"):
        load_split(yolo_dataset, "test")


def test_read_image_gives_rgb_and_clear_errors(tmp_path: Path) -> None:
    bgr = np.zeros((4, 6, 3), np.uint8)
    bgr[..., 0] = 255  # blue in OpenCV order
    cv2.imwrite(str(tmp_path / "blue.png"), bgr)
    rgb = read_image(tmp_path / "blue.png")
    assert rgb.shape == (4, 6, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [0, 0, 255]
    cv2.imwrite(str(tmp_path / "grey.png"), np.full((3, 3), 77, np.uint8))
    assert read_image(tmp_path / "grey.png").shape == (3, 3, 3)
    with pytest.raises(DatasetError, match="cannot read image"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "junk.jpg").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="not a readable image"):
        read_image(tmp_path / "junk.jpg")


def test_non_square_images_keep_their_size(tmp_path: Path) -> None:
    root = make_voc_dataset(tmp_path / "v", 2, 1, size=(80, 48))
    record = load_split(root, "train").records[0]
    assert (record.width, record.height) == (80, 48)
    assert read_image(record.path).shape == (48, 80, 3)
