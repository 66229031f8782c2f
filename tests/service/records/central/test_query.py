"""service/records/central/query.py on two stations' records forwarded into a real PostgreSQL: filters, keyset pages,
the record's JSON shape, and NG rates computed by hand."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import psycopg
import pytest

from service.records.central.forwarder import Forwarder
from service.records.central.query import PlantFilters, ng_stats, query_records
from service.records.query import QueryFilters
from tests.service.records.central.helpers import T0, add_records, settings
from tests.service.records_helpers import make_record


@pytest.fixture
def plant(central_dsn: str, tmp_path: Path) -> str:
    """st-1 (line-A): rec-0..rec-11 at T0+i; st-2 (line-B): rec-100..rec-105 at T0+i. Camera cam-(i % 3); NG when
    i % 3 == 0 (so on cam-0), with a scratch, plus a pitted surface when i % 6 == 0."""
    for station, line, start, n in (("st-1", "line-A", 0, 12), ("st-2", "line-B", 100, 6)):
        add_records(tmp_path / station, n, start=start)
        fwd = Forwarder(settings(central_dsn, station).model_copy(update={"line_id": line}), tmp_path / station)
        while fwd.forward_once():
            pass
        fwd.stop()
    return central_dsn


def _ids(rows: list[dict[str, object]]) -> list[object]:
    return [r["request_id"] for r in rows]


def test_filters_newest_first(plant: str) -> None:
    with psycopg.connect(plant) as conn:
        assert _ids(query_records(conn, PlantFilters(class_name="pitted_surface"))[0]) == ["rec-102", "rec-6", "rec-0"]
        ng = PlantFilters(station_id="st-1", verdict="NG", since=T0 + 3, until=T0 + 9)
        assert _ids(query_records(conn, ng)[0]) == ["rec-6", "rec-3"]
        assert _ids(query_records(conn, PlantFilters(line_id="line-B", camera_id="cam-0"))[0]) == ["rec-105", "rec-102"]
        station = PlantFilters.of(QueryFilters(camera_id="cam-2"), station_id="st-1")
        assert _ids(query_records(conn, station)[0]) == ["rec-11", "rec-8", "rec-5", "rec-2"]


def test_keyset_pages_cover_every_record_once(plant: str) -> None:
    seen: list[object] = []
    cursor = None
    with psycopg.connect(plant) as conn:
        for _ in range(10):
            rows, cursor = query_records(conn, PlantFilters(), limit=5, cursor=cursor)
            seen += _ids(rows)
            if cursor is None:
                break
        with pytest.raises(ValueError, match="cursor"):
            query_records(conn, PlantFilters(), cursor="bm90LWEtY3Vyc29y")
    expected = [f"rec-{i}" for i in range(105, 99, -1)] + [f"rec-{i}" for i in range(11, -1, -1)]
    assert seen == expected


def test_record_shape_is_the_stations_plus_plant_fields(plant: str) -> None:
    with psycopg.connect(plant) as conn:
        (doc,) = query_records(conn, PlantFilters(station_id="st-1", until=T0 + 1))[0]
    plant_keys = ("station_id", "line_id")  # first in a plant row (a station's record may carry them too)
    record_fields = [f.name for f in dataclasses.fields(type(make_record("x", b"x"))) if f.name not in plant_keys]
    assert list(doc) == ["station_id", "line_id", "seq", *record_fields, "image"]
    assert doc["received_at"] == T0 and doc["seq"] == 1 and doc["line_id"] == "line-A"
    assert doc["detections"][1] == {"class_id": 3, "class_name": "pitted_surface", "score": pytest.approx(0.55),
                                    "box_xyxy": [30.0, 30.0, 40.0, 44.0]}  # fmt: skip
    assert doc["image"]["state"] == "pending" and doc["image"]["object_key"] == "st-1/2026/01/01/rec-0-0-1.jpg"


def test_ng_stats_by_station_and_class(plant: str) -> None:
    with psycopg.connect(plant) as conn:
        by_station = ng_stats(conn, ("station_id",), "hour")
        by_class = ng_stats(conn, ("station_id", "class_name"), "day", since=T0, until=T0 + 86400)
        by_camera = ng_stats(conn, ("camera_id", "class_name"), "day", filters=PlantFilters(class_name="scratches"))
        overall = ng_stats(conn, (), "day")
        for bad in ({"group_by": ("verdict",)}, {"bucket": "week"}, {"filters": PlantFilters(verdict="NG")}):
            with pytest.raises(ValueError):
                ng_stats(conn, **bad)
    hour = "2026-01-01T00:00:00Z"
    assert by_station == [
        {"bucket": hour, "station_id": "st-1", "total": 12, "ng": 4, "ng_rate": pytest.approx(4 / 12)},
        {"bucket": hour, "station_id": "st-2", "total": 6, "ng": 2, "ng_rate": pytest.approx(2 / 6)},
    ]
    assert [(r["station_id"], r["class_name"], r["total"], r["ng"]) for r in by_class] == [
        ("st-1", "pitted_surface", 12, 2), ("st-1", "scratches", 12, 4),
        ("st-2", "pitted_surface", 6, 1), ("st-2", "scratches", 6, 2),
    ]  # fmt: skip
    # cam-0 holds every NG record (4 + 2 of its 6); the class filter keeps only scratches
    assert [(r["camera_id"], r["class_name"], r["total"], r["ng"], r["ng_rate"]) for r in by_camera] == [
        ("cam-0", "scratches", 6, 6, 1.0)
    ]
    assert overall == [{"bucket": hour, "total": 18, "ng": 6, "ng_rate": pytest.approx(1 / 3)}]
