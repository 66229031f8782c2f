"""Helpers of the central records tests: station journals from hand-made records, central counts, waiting."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from pydantic import SecretStr

from benchmarks.bench_forward import write_journal
from service.records.central.settings import CentralSettings
from tests.service.records_helpers import PITTED, SCRATCH, make_record

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def wait_until(check: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < end, f"{what} not reached within {timeout_s} s"
        time.sleep(0.02)


def add_records(data_dir: Path, n: int, start: int = 0, archive_ng: bool = True) -> int:
    """``n`` records ``rec-<start>``... one second apart from T0: every third NG (a scratch, every sixth a pit
    too), cameras cam-0..2; returns the journal's max seq."""
    records = []
    for i in range(start, start + n):
        ng = i % 3 == 0
        dets = ([SCRATCH, PITTED] if i % 6 == 0 else [SCRATCH]) if ng else []
        records.append(make_record(f"rec-{i}", f"img-{i}".encode(), verdict="NG" if ng else "OK",
                                   received_at=T0 + i, camera_id=f"cam-{i % 3}", detections=dets))  # fmt: skip
    return write_journal(data_dir, records, archive_ng=archive_ng)


def settings(dsn: str, station_id: str = "st-1", **kw: Any) -> CentralSettings:
    return CentralSettings(dsn=SecretStr(dsn), station_id=station_id, line_id="line-A", **kw)


def central_counts(dsn: str, station_id: str) -> tuple[int, int, int]:
    """(records, distinct seqs, detections) central holds for ``station_id``."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            """SELECT (SELECT count(*) FROM inspections WHERE station_id = %(s)s),
                      (SELECT count(DISTINCT seq) FROM inspections WHERE station_id = %(s)s),
                      (SELECT count(*) FROM detections WHERE station_id = %(s)s)""",
            {"s": station_id},
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def journal_counts(data_dir: Path) -> tuple[int, int]:
    """(records, detections) in the station's journal."""
    with sqlite3.connect(data_dir / "records.sqlite3") as conn:
        records = conn.execute("SELECT count(*) FROM inspections").fetchone()[0]
        detections = conn.execute("SELECT count(*) FROM detections").fetchone()[0]
    return int(records), int(detections)
