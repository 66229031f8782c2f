"""benchmarks/compare_ultralytics.py: both detection sets scored by pycocotools on the reader's ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.compare_ultralytics import coco_ground_truth, main, score
from train.dataset import load_split

pytest.importorskip("pycocotools")


def _perfect(split_root: Path) -> list[dict[str, object]]:
    gt = coco_ground_truth(load_split(split_root, "val"))
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in gt["annotations"]
    ]


def test_perfect_detections_score_one_and_shifted_ones_less(tmp_path: Path) -> None:
    from tests.train.conftest import make_voc_dataset

    root = make_voc_dataset(tmp_path / "voc", 1, 4, size=80)
    gt = coco_ground_truth(load_split(root, "val"))
    assert {img["id"] for img in gt["images"]} == {f"img_{i:04d}" for i in range(1, 5)}
    perfect = _perfect(root)
    assert score(gt, perfect)["map50"] == pytest.approx(1.0)
    shifted = [{**d, "bbox": [d["bbox"][0] + d["bbox"][2] * 0.6, *d["bbox"][1:]]} for d in perfect]  # type: ignore[index]
    assert score(gt, shifted)["map50"] < 0.5
    with pytest.raises(ValueError, match="not file stems"):
        score(gt, [{**perfect[0], "image_id": "other"}])


def test_cli_compares_two_result_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.train.conftest import make_voc_dataset

    root = make_voc_dataset(tmp_path / "voc", 1, 4, size=80)
    theirs, ours = tmp_path / "u.json", tmp_path / "o.json"
    theirs.write_text(json.dumps(_perfect(root)))
    ours.write_text(json.dumps(_perfect(root)[1:]))  # one ground-truth box missed
    argv = [
        "--data",
        str(root),
        "--ultralytics-json",
        str(theirs),
        "--ours-json",
        str(ours),
        "--json",
        str(tmp_path / "c.json"),
    ]
    assert main(argv) == 0
    out = json.loads((tmp_path / "c.json").read_text())
    assert out["ultralytics"]["map50"] == pytest.approx(1.0) and out["ours"]["map50"] < 1.0
    assert out["delta_map50_pt"] == pytest.approx(100 * (out["ours"]["map50"] - 1.0))
    assert "mAP50 difference (ours - ultralytics)" in capsys.readouterr().out
