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
