"""`aoi calibrate-reviews` (export/recalibrate.py, export/recalibrate_cli.py): per-class thresholds re-fitted from
review decisions recorded through the review API's functions on records a real RecordStore wrote. Thresholds move the
way the decisions say, never below the old one, and nothing is written without --out or --write."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aoi.cli import main
from export.recalibrate import Recalibration, RecalibrationOptions, format_table, recalibrate
from service.core.bundle import BUNDLE_FILE, load_bundle, sha256_file
from service.records.reviews import current_reviews
from service.records.schema import DB_NAME, open_reader
from tests.service.records.reviewed_data import CLASSES, det, png, record, review, store_records
from tests.synthetic import make_synthetic_bundle

CONFIRMED = [0.60 + 0.02 * i for i in range(10)]  # scratches the reviewers confirmed
FALSE = [0.30 + 0.01 * i for i in range(10)]  # scratches they called false: every one below the lowest confirmed


@pytest.fixture
def station(tmp_path: Path) -> tuple[Path, Path]:
    """A bundle (threshold 0.25 for every class) and a station whose records it made, reviewed:
    scratches: 10 confirmed at 0.60-0.78, 10 false calls at 0.30-0.39, and one escape added on an OK image;
    patches: 12 confirmed at 0.30-0.85; inclusion: 3 confirmed (too few to move); pitted_surface: one detection at
    0.95 relabelled to inclusion, 9 false calls at 0.5-0.58 and 2 confirmed at 0.26-0.27."""
    bundle = make_synthetic_bundle(tmp_path / "bundle", classes=CLASSES, threshold=0.25)
    model = {"model_version": "1.0.0", "model_hash": sha256_file(bundle / BUNDLE_FILE)}
    plan: list[tuple[str, int, float, str]] = []  # request id, class, score, decision
    plan += [(f"sc{i}", 0, s, "confirmed") for i, s in enumerate(CONFIRMED)]
    plan += [(f"sf{i}", 0, s, "false_call") for i, s in enumerate(FALSE)]
    plan += [(f"pa{i}", 2, 0.30 + 0.05 * i, "confirmed") for i in range(12)]
    plan += [(f"in{i}", 1, 0.5, "confirmed") for i in range(3)]
    plan += [(f"pf{i}", 3, 0.50 + 0.01 * i, "false_call") for i in range(9)]
    plan += [(f"pc{i}", 3, 0.26 + 0.01 * i, "confirmed") for i in range(2)]
    items = [(record(rid, png(n), detections=[det(c, s, (4, 4, 20, 20))], **model), png(n))
             for n, (rid, c, s, _) in enumerate(plan)]  # fmt: skip
    items.append((record("relab", png(90), detections=[det(3, 0.95, (4, 4, 20, 20))], **model), png(90)))
    items.append((record("ok", png(91), verdict="OK", **model), png(91)))
    store_records(tmp_path / "data", items)
    for rid, _, _, decision in plan:
        review(tmp_path / "data", rid, decision)
    review(tmp_path / "data", "relab", "corrected", [{"detection_ordinal": 0, "status": "relabelled", "class_id": 1}])
    review(tmp_path / "data", "ok", "corrected", [{"status": "added", "class_id": 0, "box_xyxy": [1, 1, 9, 9]}])
    return bundle, tmp_path / "data"


def _result(bundle: Path, data_dir: Path, **kw: Any) -> Recalibration:
    conn = open_reader(data_dir / DB_NAME)
    try:
        reviews = list(current_reviews(conn))
    finally:
        conn.close()
    return recalibrate(reviews, load_bundle(bundle), RecalibrationOptions(**kw))


def test_thresholds_move_as_the_decisions_say(station: tuple[Path, Path]) -> None:
    result = _result(*station)
    by = {c.name: c for c in result.classes}
    sc = by["scratches"]
    assert sc.old == 0.25 and max(FALSE) < sc.new <= min(CONFIRMED)  # above every false call, keeps every defect
    assert sc.reviewed == 20 and sc.false_calls == (10, 0) and sc.confirmed == (10, 10) and sc.missed == 1
    assert by["patches"].new == 0.25 and "keeps every reviewed detection" in by["patches"].note  # no false call
    assert by["inclusion"].new == 0.25 and "< --min-reviewed 10" in by["inclusion"].note
    assert by["inclusion"].missed == 1  # the box relabelled to it: no inclusion threshold can be said to catch it
    pitted = by["pitted_surface"]  # its false calls sit above its confirmed defects: raising would lose them
    assert pitted.new == 0.25 and pitted.relabelled == (1, 1) and pitted.false_calls == (9, 9)
    assert result.false_call_images == (19, 9)
    assert result.defective_caught == (28, 28) and result.escapes_found == 1
    table = format_table(result)
    assert (
        "10 -> 0" in table and "NG images that were false calls: 19 -> 9" in table and "thresholds only rise" in table
    )


def test_target_recall_trades_defects_for_false_calls(station: tuple[Path, Path]) -> None:
    result = _result(*station, mode="recall", target_recall=0.5)
    sc = next(c for c in result.classes if c.name == "scratches")
    # recall over 11 defects (10 confirmed + 1 added) >= 0.5 needs the 6 best: threshold just under 0.68
    assert 0.66 < sc.new <= 0.68 and sc.confirmed == (10, 6) and sc.false_calls == (10, 0)
    # patches (6 of 12 kept) and pitted_surface (1 of 2) trade defects for the target too: 28 - 4 - 6 - 1
    assert result.defective_caught == (28, 17)


def test_no_confirmed_defect_keeps_the_threshold(tmp_path: Path) -> None:
    bundle = make_synthetic_bundle(tmp_path / "bundle", classes=CLASSES, threshold=0.3)
    model = {"model_version": "1.0.0", "model_hash": sha256_file(bundle / BUNDLE_FILE)}
    items = [(record(f"f{i}", png(i), detections=[det(0, 0.4, (1, 1, 5, 5))], **model), png(i)) for i in range(12)]
    store_records(tmp_path / "data", items)
    for i in range(12):
        review(tmp_path / "data", f"f{i}", "false_call" if i else "skipped")
    (sc, *_) = _result(bundle, tmp_path / "data").classes
    assert sc.new == 0.3 and sc.reviewed == 11 and "no confirmed defect" in sc.note


def test_cli_prints_first_and_writes_only_when_asked(
    station: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle, data_dir = station
    before = (bundle / BUNDLE_FILE).read_bytes()
    args = ["calibrate-reviews", "--bundle", str(bundle), "--data-dir", str(data_dir)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "scratches" in printed and "0.2500  0.6000" in printed and "nothing written" in printed
    assert (bundle / BUNDLE_FILE).read_bytes() == before
    copy = tmp_path / "copy"
    assert main([*args, "--out", str(copy), "--version", "1.0.1"]) == 0
    assert f"wrote {copy / BUNDLE_FILE} (version 1.0.1)" in capsys.readouterr().out
    assert (bundle / BUNDLE_FILE).read_bytes() == before  # --out leaves the bundle alone
    new = load_bundle(copy)  # hashes verified
    assert new.version == "1.0.1" and new.postprocess.score_thresholds["scratches"] == pytest.approx(0.6, abs=1e-5)
    assert new.postprocess.score_thresholds["patches"] == 0.25
    per_class = (new.calibration or {})["reviews"]["per_class"]
    assert per_class["scratches"]["false_calls"] == 10 and per_class["scratches"]["false_calls_after"] == 0
    assert (copy / "model.onnx").read_bytes() == (bundle / "model.onnx").read_bytes()
    assert main([*args, "--out", str(copy)]) == 2 and "is not an empty directory" in capsys.readouterr().err
    assert main([*args, "--write", "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["per_class"]["scratches"]["confirmed_after"] == 10 and "wrote" in out.err
    written = load_bundle(bundle)
    assert written.version.startswith("1.0.0+reviews.") and written.thresholds()[0] == pytest.approx(0.6, abs=1e-5)
    # bundle.json changed: its reviews now belong to the old hash; --match-version takes them by version
    assert main(args) == 2 and "--match-version" in capsys.readouterr().err
    assert main([*args, "--match-version"]) == 2  # the version changed too
    assert "no reviewed image judged by version 1.0.0+reviews." in capsys.readouterr().err


def test_cli_errors_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate-reviews", "--bundle", str(tmp_path / "nope"), "--data-dir", str(tmp_path)]) == 2
    assert f"{tmp_path / 'nope'}: bundle directory does not exist" in capsys.readouterr().err
    bundle = make_synthetic_bundle(tmp_path / "b", classes=CLASSES)
    assert main(["calibrate-reviews", "--bundle", str(bundle), "--data-dir", str(tmp_path / "d")]) == 2
    assert f"{tmp_path / 'd' / DB_NAME}: no records database here" in capsys.readouterr().err
    assert main(["calibrate-reviews", "--bundle", str(bundle), "--target-recall", "0"]) == 2
    assert "--target-recall: must be in (0, 1]" in capsys.readouterr().err
