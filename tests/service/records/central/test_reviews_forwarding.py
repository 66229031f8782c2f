"""Review decisions forwarded to the central PostgreSQL (a real, throwaway server: see conftest) by the records
forwarder: exactly once by (station_id, review_seq), in the same transaction as the records, a decision only once
central holds its record, resends absorbed, a decision on a record central pruned dropped instead of blocking."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from aoi.cli import main
from service.records.central.forwarder import Forwarder
from service.records.central.schema import prune_before
from service.records.reviews import decide, undo
from service.records.schema import DB_NAME, open_side_writer
from tests.service.records.central.helpers import T0, add_records, settings

CLASSES = ["scratches", "inclusion", "patches", "pitted_surface"]


def _central_reviews(dsn: str, station: str = "st-1") -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            """SELECT review_seq, inspection_seq, request_id, decision, reviewer, undoes, boxes,
                   extract(epoch FROM decided_at)::float8, model_version
               FROM reviews WHERE station_id = %s ORDER BY review_seq""",
            [station],
        ).fetchall()


def test_decisions_are_forwarded_once_with_their_records(central_dsn: str, tmp_path: Path) -> None:
    add_records(tmp_path, 12)  # rec-0, 3, 6, 9 NG
    conn = open_side_writer(tmp_path / DB_NAME)
    decide(conn, "rec-0", 0, "confirmed", [], "ana", CLASSES, now=T0 + 100)
    decide(conn, "rec-3", 0, "corrected", [
        {"status": "false_call", "detection_ordinal": 0}, {"status": "added", "class_id": 2, "box_xyxy": [1, 1, 9, 9]},
    ], "bo", CLASSES, now=T0 + 101)  # fmt: skip
    undo(conn, "rec-0", 0, "ana", now=T0 + 102)
    fwd = Forwarder(settings(central_dsn, batch_size=100), tmp_path)
    assert fwd.forward_once() == 12 + 3
    assert fwd.forward_once() == 0
    rows = _central_reviews(central_dsn)
    assert [(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows] == [
        (1, 1, "rec-0", "confirmed", "ana", None), (2, 4, "rec-3", "corrected", "bo", None),
        (3, 1, "rec-0", "undo", "ana", 1),
    ]  # fmt: skip
    boxes = rows[1][6]
    assert [b["status"] for b in boxes] == ["false_call", "added"] and boxes[1]["class_name"] == "patches"
    assert rows[1][7] == T0 + 101 and rows[1][8] == "1.4.0"
    decide(conn, "rec-9", 0, "skipped", [], "cy", CLASSES)
    assert fwd.forward_once() == 1
    fwd.stop()
    again = Forwarder(settings(central_dsn, batch_size=100), tmp_path)  # a restart: the watermarks come from central
    assert again.forward_once() == 0
    again._review_watermark = 0  # as after a lost acknowledgement: the whole history is sent again...
    assert again.forward_once() == 4
    again.stop()
    assert len(_central_reviews(central_dsn)) == 4  # ...and absorbed by the key
    conn.close()


def test_a_decision_waits_for_its_record_and_keeps_its_order(central_dsn: str, tmp_path: Path) -> None:
    add_records(tmp_path, 25)
    conn = open_side_writer(tmp_path / DB_NAME)
    decide(conn, "rec-24", 0, "skipped", [], "ana", CLASSES)  # review_seq 1: record seq 25
    decide(conn, "rec-0", 0, "confirmed", [], "ana", CLASSES)  # review_seq 2: record seq 1
    fwd = Forwarder(settings(central_dsn, batch_size=10), tmp_path)
    assert fwd.forward_once() == 10 and _central_reviews(central_dsn) == []  # seq 25 not central's yet: both wait
    assert fwd.forward_once() == 10
    assert fwd.forward_once() == 5 + 2
    fwd.stop()
    assert [(r[0], r[1]) for r in _central_reviews(central_dsn)] == [(1, 25), (2, 1)]
    conn.close()


def test_a_decision_on_a_record_central_pruned_is_dropped(central_dsn: str, tmp_path: Path) -> None:
    add_records(tmp_path, 6)
    fwd = Forwarder(settings(central_dsn, batch_size=100), tmp_path)
    assert fwd.forward_once() == 6
    with psycopg.connect(central_dsn, autocommit=True) as central:
        assert prune_before(central, datetime.fromtimestamp(T0 + 3, UTC)) == 3  # rec-0..2
    conn = open_side_writer(tmp_path / DB_NAME)
    decide(conn, "rec-0", 0, "confirmed", [], "ana", CLASSES)  # its record is gone from central
    decide(conn, "rec-3", 0, "confirmed", [], "ana", CLASSES)
    assert fwd.forward_once() == 2
    assert fwd.forward_once() == 0  # the dropped one is not sent again while connected
    fwd.stop()
    assert [r[2] for r in _central_reviews(central_dsn)] == ["rec-3"]
    with psycopg.connect(central_dsn, autocommit=True) as central:
        assert prune_before(central, datetime.fromtimestamp(T0 + 10, UTC)) == 3
        assert _central_reviews(central_dsn) == []  # deleted with their records
    conn.close()


def test_plant_review_stats_match_the_stations(
    central_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.records.central.query import PlantFilters, review_stats
    from service.records.stats import review_stats as station_review_stats

    add_records(tmp_path, 12)  # NG: rec-0 (scratch + pit), rec-3, rec-6 (scratch + pit), rec-9; cameras cam-0..2
    conn = open_side_writer(tmp_path / DB_NAME)
    decide(conn, "rec-0", 0, "confirmed", [], "ana", CLASSES)
    decide(conn, "rec-3", 0, "false_call", [], "ana", CLASSES)
    decide(conn, "rec-6", 0, "false_call", [], "ana", CLASSES)
    undo(conn, "rec-6", 0, "ana")
    decide(conn, "rec-9", 0, "skipped", [], "ana", CLASSES)
    decide(conn, "rec-1", 0, "corrected", [{"status": "added", "class_id": 0, "box_xyxy": [0, 0, 5, 5]}], "a", CLASSES)
    fwd = Forwarder(settings(central_dsn, batch_size=100), tmp_path)
    while fwd.forward_once():
        pass
    fwd.stop()
    station = station_review_stats(conn, ["model_version", "camera_id"])
    with psycopg.connect(central_dsn) as central:
        plant = review_stats(central, ["model_version", "camera_id"])
        assert plant == station
        assert review_stats(central, ["station_id"], PlantFilters(camera_id="cam-1")) == [
            {"station_id": "st-1", "reviewed": 1, "reviewed_ng": 0, "confirmed": 0, "false_calls": 0, "escapes": 1,
             "false_call_rate": 0.0},
        ]  # fmt: skip
        assert review_stats(central, [], PlantFilters(station_id="nobody")) == []
    assert [(r["camera_id"], r["reviewed_ng"], r["false_calls"]) for r in plant] == [("cam-0", 2, 1), ("cam-1", 0, 0)]
    assert main(["records", "stats", "--reviews", "--db", central_dsn, "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["model_version"], row["reviewed"], row["false_call_rate"]) == ("1.4.0", 3, 0.5)
    conn.close()
