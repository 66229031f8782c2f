"""``aoi records``: export the inspection records (CSV for a spreadsheet, JSON lines for tools), show one request,
NG rates per hour or day, check the database and the archived images. Reads ``<data-dir>/records.sqlite3`` without
changing it (the service may be running: SQLite's WAL lets it read alongside the writer), or, with ``--db``, the
plant's central PostgreSQL across every station (:mod:`service.cli.plant`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.cli.dataset import add_export_dataset, run_export_dataset
from service.cli.plant import add_plant_arguments, run_plant
from service.cli.tables import add_data_dir, export_rows, since_until, stats_keys, stats_table
from service.records.query import QueryFilters, RecordReader
from service.records.schema import DB_NAME, RecordsSchemaError, open_reader
from service.records.stats import REVIEW_COUNTS, review_stats, station_stats

__all__ = ["add_arguments", "run"]


def _add_filters(action: argparse.ArgumentParser, *, verdict: bool) -> None:
    action.add_argument("--camera-id", default=None)
    action.add_argument("--part-id", default=None)
    if verdict:
        action.add_argument("--verdict", choices=("OK", "NG"), default=None)
    action.add_argument("--class-name", default=None, help="images with a detection of this class")
    action.add_argument("--since", default=None, help="received at or after: ISO 8601 (UTC unless given) or epoch s")
    action.add_argument("--until", default=None, help="received before (same forms)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="records_command", metavar="ACTION", required=True)
    export = sub.add_parser("export", help="records as CSV or JSON lines, newest first")
    export.add_argument("--format", choices=("csv", "jsonl"), default="csv", help="default csv")
    export.add_argument("--out", type=Path, default=None, help="output file (default: stdout)")
    _add_filters(export, verdict=True)
    export.add_argument("--limit", type=int, default=None, help="at most this many rows")
    show = sub.add_parser("show", help="every image recorded under one request id, as JSON")
    show.add_argument("request_id")
    stats = sub.add_parser("stats", help="NG rate and counts per hour or day, by station, camera, class, ...")
    stats.add_argument(
        "--by", default=None, help="comma-separated keys among station_id, line_id, camera_id, part_id, "
        "model_version, class_name (default camera_id,class_name; with --reviews: model_version, among "
        "model_version, camera_id, part_id, and station_id, line_id with --db)",
    )  # fmt: skip
    stats.add_argument(
        "--reviews", action="store_true", help="what the reviewers found instead: reviewed NG, confirmed, false "
        "calls, escapes and the false-call rate (docs/review.md)",
    )  # fmt: skip
    stats.add_argument("--bucket", choices=("hour", "day"), default="day", help="default day")
    stats.add_argument("--format", choices=("table", "json", "csv"), default="table", help="default table")
    _add_filters(stats, verdict=False)
    check = sub.add_parser("check", help="SQLite integrity and every kept image's file and sha256; exit 1 on problems")
    add_export_dataset(sub)
    for action in (export, stats):
        add_plant_arguments(action)
    for action in (export, show, check, stats):
        add_data_dir(action)


def _error(message: str) -> int:
    sys.stderr.write(f"aoi records: error: {message}\n")
    return 2


def _filters(args: argparse.Namespace) -> QueryFilters:
    """Raises: ValueError naming the option of a time that does not parse."""
    since, until = since_until(args)
    return QueryFilters(args.camera_id, args.part_id, getattr(args, "verdict", None), args.class_name, since, until)


def _rows(reader: RecordReader, filters: QueryFilters, limit: int | None) -> Iterator[dict[str, Any]]:
    left = limit
    cursor: str | None = None
    while left is None or left > 0:
        page, cursor = reader.query(filters, 1000 if left is None else min(left, 1000), cursor)
        yield from page
        left = None if left is None else left - len(page)
        if cursor is None:
            break


def _check(reader: RecordReader, db: Path) -> int:
    problems = reader.integrity_check()
    records = reader.conn.execute("SELECT COUNT(*) FROM inspections").fetchone()[0]
    files = reader.conn.execute("SELECT COUNT(*) FROM archive_files WHERE deleted_at IS NULL").fetchone()[0]
    for problem in problems:
        print(f"{db.parent}: {problem}")
    if problems:
        sys.stderr.write(f"aoi records check: {len(problems)} problem(s) in {db} and its archive\n")
        return 1
    print(f"{db}: ok ({records} records, {files} archived files checked)")
    return 0


def _show(reader: RecordReader, request_id: str) -> int:
    images = reader.get(request_id)
    if not images:
        sys.stderr.write(f"aoi records show: no inspection recorded under request id {request_id!r}\n")
        return 1
    print(json.dumps({"request_id": request_id, "images": images}, indent=2, ensure_ascii=False))
    return 0


def _stats(conn: sqlite3.Connection, args: argparse.Namespace, filters: QueryFilters) -> int:
    keys = stats_keys(args)
    try:
        if args.reviews:
            stats_table(review_stats(conn, keys, filters), keys, args.format, sys.stdout, REVIEW_COUNTS)
            return 0
        rows = station_stats(conn, keys, args.bucket, filters)
    except ValueError as exc:
        return _error(f"--by / --bucket: {exc}")
    stats_table(rows, keys, args.format, sys.stdout)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.records_command == "export-dataset":
        return run_export_dataset(args)
    filters = None
    if args.records_command in ("export", "stats"):
        if args.records_command == "export" and args.limit is not None and args.limit < 1:
            return _error(f"--limit: must be >= 1, got {args.limit}")
        try:
            filters = _filters(args)
        except ValueError as exc:
            return _error(str(exc))
    if getattr(args, "db", None) is not None:
        assert filters is not None
        return run_plant(args, filters)
    return _run_station(args, filters)


def _run_station(args: argparse.Namespace, filters: QueryFilters | None) -> int:
    db = args.data_dir / DB_NAME
    try:
        conn = open_reader(db)
    except RecordsSchemaError as exc:
        return _error(str(exc))
    reader = RecordReader(conn, args.data_dir)
    try:
        if args.records_command == "check":
            return _check(reader, db)
        if args.records_command == "show":
            return _show(reader, args.request_id)
        assert filters is not None
        if args.records_command == "stats":
            return _stats(conn, args, filters)
        with contextlib.ExitStack() as stack:
            out = sys.stdout
            if args.out is not None:
                out = stack.enter_context(args.out.open("w", encoding="utf-8", newline=""))
            return export_rows(_rows(reader, filters, args.limit), args, out)
    except OSError as exc:
        return _error(f"{exc.filename or args.out}: cannot write ({exc.strerror or exc})")
    except sqlite3.Error as exc:
        return _error(f"{db}: {exc}")
    finally:
        conn.close()
