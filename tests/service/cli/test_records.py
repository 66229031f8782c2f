"""service/cli/records.py (`aoi records export|show|check`) on a database a real RecordStore wrote."""

from __future__ import annotations

import asyncio
import csv
import json
import time
from pathlib import Path

import pytest

from aoi.cli import main
from service.records.store import RecordStore
from service.settings import RecordsSettings
from tests.service.records_helpers import PITTED, SCRATCH, make_image, make_record

NOW = time.time()
A, B = make_image(1), make_image(2, "png")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    async def fill() -> None:
        store = RecordStore(RecordsSettings(), tmp_path, sweep_interval_s=3600)
        store.start()
        dets = [SCRATCH, dict(SCRATCH, score=0.97), PITTED]
        await store.add(
            [
                (make_record("r1", A, detections=dets, part_id="P-7", received_at=NOW - 3600), A),
                (make_record("r2", B, verdict="OK", camera_id="cam-2", received_at=NOW), B),
            ]
        )
        await store.close(5.0)

    asyncio.run(fill())
    return tmp_path


def test_export_csv_summarises_detections(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "records.csv"
    assert main(["records", "export", "--data-dir", str(data_dir), "--out", str(out)]) == 0
    assert "2 record(s) exported" in capsys.readouterr().err
    with out.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["request_id"] for r in rows] == ["r2", "r1"]  # newest first
    r1 = rows[1]
    assert r1["classes"] == "scratches:2;pitted_surface:1" and r1["max_score"] == "0.9700"
    assert r1["detections"] == "3" and len(json.loads(r1["detections_json"])) == 3
    assert r1["image_status"] == "kept" and r1["image_path"].startswith("images/")
    assert r1["received_at"].endswith("Z") and r1["part_id"] == "P-7" and r1["total_ms"] == "10.0"
    assert rows[0]["classes"] == "" and rows[0]["image_status"] == "not archived"


def test_export_jsonl_with_filters(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["records", "export", "--data-dir", str(data_dir), "--format", "jsonl"]
    assert main([*args, "--verdict", "NG", "--class-name", "pitted_surface"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(x)["request_id"] for x in lines] == ["r1"]
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(NOW - 60))
    assert main([*args, "--since", since]) == 0
    assert [json.loads(x)["request_id"] for x in capsys.readouterr().out.splitlines()] == ["r2"]
    assert main([*args, "--limit", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_show(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["records", "show", "r1", "--data-dir", str(data_dir)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["request_id"] == "r1" and doc["images"][0]["detections"][2]["class_name"] == "pitted_surface"
    assert main(["records", "show", "nobody", "--data-dir", str(data_dir)]) == 1
    assert "nobody" in capsys.readouterr().err


def test_check_lists_problems_and_exits_1(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["records", "check", "--data-dir", str(data_dir)]) == 0
    assert "ok (2 records, 1 archived files checked)" in capsys.readouterr().out
    (kept,) = (data_dir / "images").rglob("*.jpg")
    kept.write_bytes(b"overwritten")
    assert main(["records", "check", "--data-dir", str(data_dir)]) == 1
    out = capsys.readouterr().out
    assert kept.name in out and "sha256" in out


def test_errors_name_the_file_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["records", "export", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "records.sqlite3") in err and "no records database" in err and "Traceback" not in err
    (tmp_path / "records.sqlite3").write_bytes(b"junk" * 1000)
    assert main(["records", "check", "--data-dir", str(tmp_path)]) == 2
    assert "not a records database" in capsys.readouterr().err
    assert main(["records", "export", "--data-dir", str(tmp_path), "--since", "soon"]) == 2
    assert "--since" in capsys.readouterr().err


def test_stats_gives_ng_rates_per_day_by_camera_and_class(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """r1 (cam-1, NG: 2 scratches + 1 pitted) and r2 (cam-2, OK), within one UTC day unless midnight falls between
    them: per class, an NG inspection counts once for each class it holds, over its camera's total."""
    day = time.strftime("%Y-%m-%dT00:00:00Z", time.gmtime(NOW))
    assert main(["records", "stats", "--data-dir", str(data_dir), "--format", "json", "--since", str(NOW - 60)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == []  # r2 is OK: no class made it NG; r1 is before --since
    assert main(["records", "stats", "--data-dir", str(data_dir), "--format", "json", "--by", "camera_id"]) == 0
    rows = [r for r in json.loads(capsys.readouterr().out) if r["bucket"] == day]
    by_camera = {r["camera_id"]: (r["total"], r["ng"], r["ng_rate"]) for r in rows}
    assert by_camera.get("cam-2") == (1, 0, 0.0)
    if time.gmtime(NOW - 3600).tm_yday == time.gmtime(NOW).tm_yday:
        assert by_camera.get("cam-1") == (1, 1, 1.0)
        assert main(["records", "stats", "--data-dir", str(data_dir), "--format", "json"]) == 0
        per_class = {
            (r["camera_id"], r["class_name"]): (r["total"], r["ng"]) for r in json.loads(capsys.readouterr().out)
        }
        assert per_class == {("cam-1", "pitted_surface"): (1, 1), ("cam-1", "scratches"): (1, 1)}


def test_stats_table_and_bad_keys(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["records", "stats", "--data-dir", str(data_dir), "--by", "camera_id", "--bucket", "hour"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["bucket", "camera_id", "total", "ng", "ng_rate"] and len(lines) == 3
    assert main(["records", "stats", "--data-dir", str(data_dir), "--by", "camera_id,colour"]) == 2
    assert "colour" in capsys.readouterr().err


def test_records_carry_the_station_identity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dataclasses import replace

    async def fill() -> None:
        store = RecordStore(RecordsSettings(), tmp_path, sweep_interval_s=3600)
        store.start()
        await store.add([(replace(make_record("s1", A), station_id="line3-a", line_id="line3"), A)])
        await store.close(5.0)

    asyncio.run(fill())
    assert main(["records", "show", "s1", "--data-dir", str(tmp_path)]) == 0
    (image,) = json.loads(capsys.readouterr().out)["images"]
    assert image["station_id"] == "line3-a" and image["line_id"] == "line3"
