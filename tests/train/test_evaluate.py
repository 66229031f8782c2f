"""train/evaluate.py + train/predict.py: COCO protocol on hand-worked cases, perfect predictions, agreement with
pycocotools on random predictions, the confusion matrix, and evaluation of a torch model through the letterbox."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from service.core.postprocess import Detections
from train.dataset import DatasetSplit, ImageRecord
from train.evaluate import box_iou, evaluate_detections, evaluate_model
from train.predict import predict_split


def _split(gts: list[list[tuple[list[float], int]]], nc: int = 2, size: tuple[int, int] = (200, 200)) -> DatasetSplit:
    records = []
    for i, objects in enumerate(gts):
        boxes = np.array([b for b, _ in objects], np.float32).reshape(-1, 4)
        classes = np.array([c for _, c in objects], np.int64)
        records.append(ImageRecord(Path(f"im{i}.jpg"), size[0], size[1], boxes, classes, f"im{i}"))
    return DatasetSplit([f"c{k}" for k in range(nc)], records, Path("."), "val")


def _dets(items: list[tuple[list[float], float, int]]) -> Detections:
    return Detections(
        np.array([b for b, _, _ in items], np.float32).reshape(-1, 4),
        np.array([s for _, s, _ in items], np.float32),
        np.array([c for _, _, c in items], np.int64),
    )


def test_box_iou() -> None:
    iou = box_iou(np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]]))
    np.testing.assert_allclose(iou, [[1.0, 50 / 150, 0.0]])


def test_perfect_predictions_score_one() -> None:
    split = _split([[([10, 10, 60, 40], 0), ([100, 100, 200, 200], 1)], [([5, 5, 20, 20], 1)]])
    preds = [
        _dets([(list(map(float, b)), 0.9, int(c)) for b, c in zip(r.boxes_xyxy, r.class_ids, strict=True)])
        for r in split.records
    ]
    result = evaluate_detections(preds, split)
    assert result.map50 == result.map50_95 == 1.0
    assert result.precision == pytest.approx(1.0) and result.recall == pytest.approx(1.0)
    assert result.f1 == pytest.approx(1.0)
    assert [result.ap_small, result.ap_medium, result.ap_large] == pytest.approx([1.0, 1.0, 1.0])
    assert list(result.per_class) == ["c0", "c1"]
    for name, instances in (("c0", 1), ("c1", 2)):
        stats = result.per_class[name]
        assert stats["instances"] == instances
        assert [stats[k] for k in ("ap50", "ap50_95", "precision", "recall")] == pytest.approx([1.0] * 4)


def test_hand_worked_iou_thresholds() -> None:
    # det A (score .9) overlaps the gt with IoU 0.62, det B (score .8) is exact. IoU .50/.55/.60: A is TP, B FP ->
    # AP 1. IoU .65-.95 (7 thresholds): A FP, then B TP -> precision 0.5 at recall 1 -> AP 0.5. Mean: 0.65.
    split = _split([[([0, 0, 10, 10], 0)]], nc=1)
    preds = [_dets([([0, 0, 10, 6.2], 0.9, 0), ([0, 0, 10, 10], 0.8, 0)])]
    result = evaluate_detections(preds, split)
    assert result.map50 == pytest.approx(1.0)
    np.testing.assert_allclose(result.ap[0], [1, 1, 1] + [0.5] * 7)
    assert result.map50_95 == pytest.approx(0.65)


def test_hand_worked_missed_object_and_class_without_ground_truth() -> None:
    # Two gts of class 0, one found: precision 1 up to recall 0.5 -> 51 of the 101 recall points.
    split = _split([[([0, 0, 50, 50], 0), ([100, 100, 150, 150], 0)]], nc=2)
    preds = [_dets([([0, 0, 50, 50], 0.7, 0), ([10, 10, 30, 30], 0.9, 1)])]
    result = evaluate_detections(preds, split)
    assert result.map50 == pytest.approx(51 / 101)
    assert result.per_class["c1"]["ap50"] is None and result.per_class["c1"]["instances"] == 0  # not in the mean
    assert result.recall == pytest.approx(0.5) and result.precision == pytest.approx(1.0)
    assert result.ap_small is None and result.ap_large is None and result.ap_medium == pytest.approx(51 / 101)


def test_to_json_shape() -> None:
    split = _split([[([0, 0, 50, 50], 0)]], nc=2)
    doc = evaluate_detections([_dets([([0, 0, 50, 50], 0.5, 0)])], split).to_json()
    assert list(doc) == [
        "map50",
        "map50_95",
        "precision",
        "recall",
        "f1",
        "ap_small",
        "ap_medium",
        "ap_large",
        "per_class",
    ]
    assert doc["per_class"] == {"c0": {"ap50": 1.0, "ap50_95": 1.0}, "c1": {"ap50": None, "ap50_95": None}}


def test_confusion_matrix() -> None:
    split = _split([[([0, 0, 50, 50], 0), ([100, 100, 150, 150], 1), ([0, 100, 50, 150], 1)]], nc=2)
    preds = [
        _dets(
            [
                ([0, 0, 50, 50], 0.9, 1),  # class 0 called class 1
                ([100, 100, 150, 150], 0.8, 1),  # correct
                ([150, 0, 190, 40], 0.7, 0),  # false positive
                ([0, 100, 50, 150], 0.1, 1),  # below the 0.25 confusion threshold -> the gt is missed
            ]
        )
    ]
    matrix = evaluate_detections(preds, split).confusion
    np.testing.assert_array_equal(matrix, [[0, 0, 1], [1, 1, 0], [0, 1, 0]])


def test_wrong_prediction_count_is_an_error() -> None:
    with pytest.raises(ValueError, match="1 detection sets for 2 images"):
        evaluate_detections([_dets([])], _split([[], []]))


def _random_case(seed: int, n_images: int = 30, nc: int = 3) -> tuple[DatasetSplit, list[Detections]]:
    rng = np.random.default_rng(seed)
    gts, preds = [], []
    for i in range(n_images):
        w, h = 200, 160
        objects = []
        for _ in range(int(rng.integers(0, 6))):
            x, y = rng.uniform(0, 150), rng.uniform(0, 110)
            bw, bh = rng.uniform(3, 130), rng.uniform(3, 130)
            objects.append(([x, y, min(x + bw, w), min(y + bh, h)], int(rng.integers(0, nc))))
        if i == 0:  # boundary areas (exactly 32^2 and 96^2) and an exactly repeated box, as in NEU-DET
            objects += [([0, 0, 32, 32], 0), ([10, 4, 58, 196], 1), ([0, 0, 32, 32], 0)]
            h = 200
        gts.append(objects)
        items = []
        for box, c in objects:  # noisy true positives, sometimes with the wrong class
            for _ in range(int(rng.integers(0, 3))):
                jitter = np.asarray(box) + rng.normal(0, 3, 4)
                cls = c if rng.random() < 0.8 else int(rng.integers(0, nc))
                items.append((jitter.tolist(), float(rng.uniform(0.3, 1.0)), cls))
        n_random = 250 if i == 1 else int(rng.integers(0, 40))  # image 1 has > 100 detections per class
        for _ in range(n_random):
            x, y = rng.uniform(0, 190), rng.uniform(0, 150)
            items.append(
                (
                    [x, y, x + rng.uniform(1, 80), y + rng.uniform(1, 80)],
                    float(rng.uniform(0, 0.8)),
                    int(rng.integers(0, nc)),
                )
            )
        boxes = np.array([b for b, _, _ in items], np.float32).reshape(-1, 4)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        scores = np.array([s for _, s, _ in items], np.float32)
        order = np.argsort(-scores)
        preds.append(Detections(boxes[order], scores[order], np.array([c for _, _, c in items], np.int64)[order]))
    split = _split(gts, nc=nc, size=(200, 160))
    split.records[0] = ImageRecord(
        Path("im0.jpg"), 200, 200, split.records[0].boxes_xyxy, split.records[0].class_ids, "im0"
    )
    return split, preds


def _pycocotools_stats(split: DatasetSplit, preds: list[Detections]) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    annotations = []
    for i, record in enumerate(split.records):
        for box, c in zip(record.boxes_xyxy.astype(float), record.class_ids, strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": int(c),
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    detections = [
        {
            "image_id": i,
            "category_id": int(c),
            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
            "score": float(s),
        }
        for i, d in enumerate(preds)
        for b, s, c in zip(d.boxes_xyxy, d.scores, d.class_ids, strict=True)
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": [{"id": i, "width": r.width, "height": r.height} for i, r in enumerate(split.records)],
            "annotations": annotations,
            "categories": [{"id": k, "name": n} for k, n in enumerate(split.class_names)],
        }
        gt.createIndex()
        coco_eval = COCOeval(gt, gt.loadRes(detections), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return np.asarray(coco_eval.stats)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_pycocotools(seed: int) -> None:
    split, preds = _random_case(seed)
    ours = evaluate_detections(preds, split)
    stats = _pycocotools_stats(split, preds)
    assert ours.map50_95 > 0.05  # a meaningful case, not all zeros
    assert ours.map50_95 == pytest.approx(stats[0], abs=1e-3)
    assert ours.map50 == pytest.approx(stats[1], abs=1e-3)
    assert ours.ap_small == pytest.approx(stats[3], abs=1e-3)
    assert ours.ap_medium == pytest.approx(stats[4], abs=1e-3)
    assert ours.ap_large == pytest.approx(stats[5], abs=1e-3)


class _ConstantDetector(torch.nn.Module):
    """Always 'sees' one box at letterboxed xyxy ``box`` with score 0.9 for class 0 (an InferenceModel stand-in)."""

    def __init__(self, box: list[float]) -> None:
        super().__init__()
        x1, y1, x2, y2 = box
        self.register_buffer("row", torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, 0.9, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.float32 and float(x.max()) <= 1.0
        return self.row.view(1, 6, 1).expand(x.shape[0], 6, 2).clone()


def test_evaluate_model_maps_boxes_back_through_the_letterbox(tmp_path: Path) -> None:
    # 128x64 images letterboxed to 64: scale 0.5, pad_y 16. Original gt (20, 10, 80, 50) -> input (10, 21, 40, 41).
    records = []
    for i in range(3):
        path = tmp_path / f"im{i}.png"
        cv2.imwrite(str(path), np.full((64, 128, 3), 90, np.uint8))
        records.append(
            ImageRecord(path, 128, 64, np.array([[20, 10, 80, 50]], np.float32), np.array([0], np.int64), path.stem)
        )
    split = DatasetSplit(["a", "b"], records, tmp_path, "val")
    model = _ConstantDetector([10, 21, 40, 41]).train()
    result, preds = evaluate_model(model, split, imgsz=64, batch_size=2)
    assert model.training  # restored
    assert result.map50_95 == pytest.approx(1.0)
    np.testing.assert_allclose(preds[2].boxes_xyxy, [[20, 10, 80, 50]], atol=1e-4)
    with pytest.raises(ValueError, match="model output has shape"):
        predict_split(lambda imgs: np.zeros((len(imgs), 5, 1), np.float32), split, input_hw=(64, 64))
