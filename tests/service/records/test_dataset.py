"""`aoi records export-dataset --reviewed` (service/records/dataset.py, service/cli/dataset.py) on records a real
RecordStore wrote and decisions the review API's functions recorded: the YOLO layout, label coordinates, negatives,
dedup by sha256, the part-grouped split, the manifest, the errors, and one epoch of `aoi train` on the output."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
import yaml

from aoi.cli import main
from service.records.dataset import (
    DatasetExportError,
    DatasetOptions,
    ExportReport,
    ReviewFilters,
    assign_splits,
    export_reviewed,
)
from service.records.schema import DB_NAME, open_reader
from tests.service.records.reviewed_data import CLASSES, det, png, record, review, store_records
from tests.synthetic import make_synthetic_bundle
from train.dataset import load_split

IMG = {k: png(i) for i, k in enumerate("ABCDEGH")}
SHA = {k: hashlib.sha256(v).hexdigest() for k, v in IMG.items()}


@pytest.fixture(scope="module")
def station(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight reviewed images: A corrected (confirmed + relabelled + added), B false call (same part as A), C
    confirmed, D skipped, E an OK image with an added box, F the same bytes as C decided earlier, G confirmed but its
    archived file deleted, H confirmed without a part id."""
    data_dir = tmp_path_factory.mktemp("station")
    scratch = det(0, 0.8, (8, 8, 24, 24))
    a_dets = [det(0, 0.91, (4, 6, 20, 22)), det(3, 0.55, (30, 30, 40, 44))]
    rows = [
        ("rA", "A", "P1", a_dets),
        ("rB", "B", "P1", [det(0, 0.6, (0, 0, 10, 10))]),
        ("rC", "C", "P2", [scratch]),
        ("rD", "D", "P5", [scratch]),
        ("rE", "E", "P3", []),
        ("rF", "C", "P2", [scratch]),
        ("rG", "G", "P4", [scratch]),
        ("rH", "H", None, [det(0, 0.7, (40, 40, 48, 48))]),
    ]
    store_records(
        data_dir,
        [
            (record(rid, IMG[k], part_id=part, detections=dets, verdict="NG" if dets else "OK"), IMG[k])
            for rid, k, part, dets in rows
        ],
    )
    corrected = [
        {"detection_ordinal": 0, "status": "confirmed"},
        {"detection_ordinal": 1, "status": "relabelled", "class_id": 1},
        {"status": "added", "class_id": 2, "box_xyxy": [10, 30, 20, 40]},
    ]
    review(data_dir, "rA", "corrected", corrected)
    review(data_dir, "rB", "false_call")
    review(data_dir, "rC", "confirmed", now=2000.0)
    review(data_dir, "rD", "skipped")
    review(data_dir, "rE", "corrected", [{"status": "added", "class_id": 0, "box_xyxy": [1, 1, 9, 9]}])
    review(data_dir, "rF", "confirmed", now=1000.0)
    review(data_dir, "rG", "confirmed")
    review(data_dir, "rH", "confirmed")
    (archived,) = data_dir.glob(f"images/*/*/*/{SHA['G']}.png")
    archived.unlink()
    return data_dir


def _export(station: Path, out: Path, **kw: Any) -> ExportReport:
    conn = open_reader(station / DB_NAME)
    try:
        return export_reviewed(conn, station, station / DB_NAME, DatasetOptions(out, **kw))
    finally:
        conn.close()


def _labels(out: Path, sha: str) -> list[str]:
    (path,) = out.glob(f"labels/*/{sha}.txt")
    return path.read_text(encoding="utf-8").splitlines()


def _split_of(out: Path, sha: str) -> str:
    (path,) = out.glob(f"images/*/{sha}.png")
    return path.parent.name


def test_layout_labels_negatives_and_manifest(station: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    _export(station, out, val_fraction=0.4, seed=3)
    data = yaml.safe_load((out / "data.yaml").read_text(encoding="utf-8"))
    assert data == {"path": ".", "train": "images/train", "val": "images/val", "nc": 4, "names": CLASSES}
    # A: the confirmed box, the relabelled one under its new class, the added one (normalised cx cy w h of 48 px)
    assert _labels(out, SHA["A"]) == [
        "0 0.250000 0.291667 0.333333 0.333333",
        "1 0.729167 0.770833 0.208333 0.291667",
        "2 0.312500 0.729167 0.208333 0.208333",
    ]
    assert _labels(out, SHA["B"]) == []  # a false call is a negative: an empty label file
    assert _labels(out, SHA["E"]) == ["0 0.104167 0.104167 0.166667 0.166667"]  # the escape found on an OK image
    assert _labels(out, SHA["H"]) == ["0 0.916667 0.916667 0.166667 0.166667"]
    assert not list(out.glob(f"images/*/{SHA['D']}.*")) and not list(out.glob(f"images/*/{SHA['G']}.*"))
    assert _split_of(out, SHA["A"]) == _split_of(out, SHA["B"])  # one part, one split
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["counts"] == {
        "images": 5, "train": manifest["counts"]["train"], "val": manifest["counts"]["val"], "negatives": 1,
        "boxes": 6, "skipped": {"no archived file: missing": 1}, "duplicates": 1, "skipped_decisions": 1,
        "filtered_out": 0, "boxes_outside_image": 0,
    }  # fmt: skip
    assert manifest["counts"]["train"] > 0 and manifest["counts"]["val"] > 0
    assert [(s["request_id"], s["sha256"]) for s in manifest["skipped"]] == [("rG", SHA["G"])]
    assert manifest["duplicates"] == [{"request_id": "rF", "image_index": 0, "sha256": SHA["C"], "kept": "rC/0"}]
    by_request = {i["request_id"]: i for i in manifest["images"]}
    assert sorted(by_request) == ["rA", "rB", "rC", "rE", "rH"]
    assert by_request["rA"]["file"] == f"images/{_split_of(out, SHA['A'])}/{SHA['A']}.png"
    assert by_request["rB"]["decision"] == "false_call" and by_request["rB"]["labels"] == 0
    with (out / "manifest.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["request_id"]: r["split"] for r in rows} == {k: v["split"] for k, v in by_request.items()}
    for name in ("A", "C", "E", "H"):
        (path,) = out.glob(f"images/*/{SHA[name]}.png")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA[name]


def test_train_loader_reads_the_export_unchanged(station: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    _export(station, out, val_fraction=0.4, seed=3)
    splits = {s: load_split(out / "data.yaml", s) for s in ("train", "val")}
    assert splits["train"].class_names == CLASSES
    records = {r.stem: r for s in splits.values() for r in s.records}
    assert sorted(records) == sorted(SHA[k] for k in "ABCEH")
    a = records[SHA["A"]]
    np.testing.assert_allclose(a.boxes_xyxy, [[4, 6, 20, 22], [30, 30, 40, 44], [10, 30, 20, 40]], atol=1e-3)
    assert a.class_ids.tolist() == [0, 1, 2] and len(records[SHA["B"]].class_ids) == 0


def test_split_is_by_part_and_deterministic(station: Path, tmp_path: Path) -> None:
    def splits(out: Path, seed: int) -> dict[str, str]:
        _export(station, out, val_fraction=0.4, seed=seed)
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        return {i["request_id"]: i["split"] for i in manifest["images"]}

    first = splits(tmp_path / "a", 5)
    assert splits(tmp_path / "b", 5) == first
    seen = {frozenset(splits(tmp_path / f"s{seed}", seed).items()) for seed in range(6)}
    assert len(seen) > 1  # the seed moves whole parts
    for s in seen:
        d = dict(s)
        assert d["rA"] == d["rB"] and {"train", "val"} <= set(d.values())
    sizes = {"part:P1": 5, "part:P2": 1, "image:x": 1, "image:y": 1, "part:P3": 2}
    for seed in range(20):
        val = assign_splits(sizes, 0.2, seed)
        assert val and val != set(sizes)
    assert assign_splits(sizes, 0.0, 0) == set()
    with pytest.raises(ValueError):
        assign_splits({"part:P1": 3}, 0.2, 0)


def test_filters_and_classes_from_the_records(station: Path, tmp_path: Path) -> None:
    out = tmp_path / "p2"
    report = _export(station, out, filters=ReviewFilters(part_id="P2"), val_fraction=0.0)
    data = yaml.safe_load((out / "data.yaml").read_text(encoding="utf-8"))
    assert data["val"] == "images/train" and data["names"] == CLASSES  # ids 0-3 all named by boxes or detections
    assert [i["request_id"] for i in report.images] == ["rC"]
    assert report.filtered_out == 5
    with pytest.raises(DatasetExportError, match=r"one group \(part:P2\).*--val-fraction 0"):
        _export(station, tmp_path / "p2b", filters=ReviewFilters(part_id="P2"))
    with pytest.raises(DatasetExportError, match=r"none of the 1 reviewed image.*no archived file: missing"):
        _export(station, tmp_path / "p4", filters=ReviewFilters(part_id="P4"), val_fraction=0.0)
    with pytest.raises(DatasetExportError, match="no reviewed image to export"):
        _export(station, tmp_path / "none", filters=ReviewFilters(model_version="9.9"))
    assert not (tmp_path / "p2b").exists() and not list(tmp_path.glob(".*.partial"))


def test_cli_summary_and_errors(station: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = make_synthetic_bundle(tmp_path / "bundle", classes=CLASSES)
    out = tmp_path / "ds"
    args = ["records", "export-dataset", "--reviewed", "--data-dir", str(station), "--out", str(out)]
    assert main([*args, "--bundle", str(bundle), "--val-fraction", "0.4"]) == 0
    printed = capsys.readouterr().out
    assert "exported 5 reviewed image(s)" in printed and "1 negative(s)" in printed
    assert "skipped 1 reviewed image(s) (only archived images can be exported): 1 no archived file: missing" in printed
    assert "1 duplicate image(s)" in printed and "1 image(s) whose decision is 'skipped'" in printed
    assert f"aoi train --data {out / 'data.yaml'}" in printed

    def error(*extra: str) -> str:
        assert main([*args, *extra]) == 2
        return capsys.readouterr().err

    assert "is not empty; choose a new directory or pass --force" in error()
    assert main([*args, "--force"]) == 0  # replaces an earlier export
    capsys.readouterr()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    other = ["records", "export-dataset", "--reviewed", "--data-dir", str(station), "--out", str(tmp_path / "other")]
    assert main([*other, "--force"]) == 2
    assert "--force only replaces an earlier export-dataset output" in capsys.readouterr().err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    missing = ["records", "export-dataset", "--reviewed", "--data-dir", str(tmp_path / "nowhere"), "--out", "x"]
    assert main(missing) == 2
    assert f"{tmp_path / 'nowhere' / DB_NAME}: no records database here" in capsys.readouterr().err
    assert "--since: " in error("--force", "--since", "yesterday")
    assert "--val-fraction: must be in [0, 1)" in error("--force", "--val-fraction", "1")
    assert "--bundle: " in error("--force", "--bundle", str(tmp_path / "no-bundle"))
    with pytest.raises(SystemExit):
        main(["records", "export-dataset", "--data-dir", str(station), "--out", str(tmp_path / "y")])  # no --reviewed


def test_errors_on_a_station_without_reviews_or_class_names(tmp_path: Path) -> None:
    dets = [det(0, 0.9, (1, 1, 9, 9)), det(3, 0.5, (2, 2, 8, 8))]
    store_records(tmp_path, [(record("r1", png(1), detections=dets), png(1))])
    with pytest.raises(DatasetExportError, match="no reviewed image to export"):
        _export(tmp_path, tmp_path / "out")
    review(tmp_path, "r1", "confirmed")
    with pytest.raises(DatasetExportError, match=r"class id\(s\) \[1, 2\] appear in no record: pass --bundle"):
        _export(tmp_path, tmp_path / "out")


@pytest.fixture
def _restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.usefixtures("_restore_threads")
def test_exported_dataset_trains_one_epoch_with_aoi_train(tmp_path: Path) -> None:
    data_dir = tmp_path / "station"
    items, boxes = [], {}
    for i in range(10):
        image = png(100 + i)
        grey = np.asarray(cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_GRAYSCALE))
        ys, xs = np.nonzero(grey == 230)  # the bright square png() drew
        boxes[f"t{i}"] = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        dets = [det(i % 2, 0.8, boxes[f"t{i}"])]
        items.append((record(f"t{i}", image, part_id=f"P{i // 2}", detections=dets), image))
    store_records(data_dir, items)
    for i in range(10):
        review(data_dir, f"t{i}", "confirmed" if i != 3 else "false_call")
    out = tmp_path / "ds"
    bundle = make_synthetic_bundle(tmp_path / "b", classes=CLASSES)
    export = ["records", "export-dataset", "--reviewed", "--data-dir", str(data_dir), "--out", str(out)]
    assert main([*export, "--val-fraction", "0.3", "--bundle", str(bundle)]) == 0
    run = tmp_path / "run"
    args = ["train", "--model", "yolo11n", "--data", str(out / "data.yaml"), "--epochs", "1", "--imgsz", "64"]
    args += ["--batch", "4", "--workers", "0", "--threads", "1", "--out", str(run), "warmup_epochs=0"]
    assert main(args) == 0
    assert (run / "last.pt").is_file() and (run / "results.csv").is_file()
    with (run / "results.csv").open(encoding="utf-8") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1"]
