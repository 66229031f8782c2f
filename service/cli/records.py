"""``aoi records``: export the inspection records (CSV for a spreadsheet, JSON lines for tools), show one request,
check the database and the archived images. Reads ``<data-dir>/records.sqlite3`` without changing it (the service
may be running: SQLite's WAL lets it read alongside the writer)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from service.records.query import QueryFilters, RecordReader, parse_time
from service.records.schema import DB_NAME, RecordsSchemaError, open_reader

__all__ = ["CSV_COLUMNS", "add_arguments", "csv_row", "run"]

CSV_COLUMNS = (
    "seq", "received_at", "request_id", "image_index", "camera_id", "part_id", "filename", "verdict", "detections",
    "classes", "max_score", "model_name", "model_version", "model_hash", "backend", "precision", "width", "height",
    "tiled", "tiles", "total_ms", "image_bytes", "image_sha256", "image_path", "image_status", "detections_json",
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="records_command", metavar="ACTION", required=True)
    export = sub.add_parser("export", help="records as CSV or JSON lines, newest first")
    export.add_argument("--format", choices=("csv", "jsonl"), default="csv", help="default csv")
    export.add_argument("--out", type=Path, default=None, help="output file (default: stdout)")
    export.add_argument("--camera-id", default=None)
    export.add_argument("--part-id", default=None)
    export.add_argument("--verdict", choices=("OK", "NG"), default=None)
    export.add_argument("--class-name", default=None, help="images with a detection of this class")
    export.add_argument("--since", default=None, help="received at or after: ISO 8601 (UTC unless given) or epoch s")
    export.add_argument("--until", default=None, help="received before (same forms)")
    export.add_argument("--limit", type=int, default=None, help="at most this many rows")
    show = sub.add_parser("show", help="every image recorded under one request id, as JSON")
    show.add_argument("request_id")
    check = sub.add_parser("check", help="SQLite integrity and every kept image's file and sha256; exit 1 on problems")
    for action in (export, show, check):
        action.add_argument(
            "--data-dir",
            type=Path,
            default=Path(os.environ.get("AOI_DATA_DIR") or "data"),
            help="the service's data_dir (default: $AOI_DATA_DIR, else data)",
        )


def _error(message: str) -> int:
    sys.stderr.write(f"aoi records: error: {message}\n")
    return 2


def csv_row(doc: dict[str, Any]) -> dict[str, Any]:
    """One record as a spreadsheet row: detections summarised (``classes`` ``scratches:2;pitted_surface:1`` by count,
    ``max_score``) and kept whole in ``detections_json``; times as ISO 8601 UTC."""
    dets = doc["detections"]
    counts = Counter(d["class_name"] for d in dets)
    image = doc["image"]
    status = "kept" if image["kept"] else (f"deleted ({image['deleted_reason']})" if image["path"] else "not archived")
    received = doc["received_at"]
    return {
        **{k: doc[k] for k in CSV_COLUMNS if k in doc and k != "detections"},
        "received_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(received)) + f".{int(received % 1 * 1000):03d}Z",
        "detections": len(dets),
        "classes": ";".join(f"{name}:{n}" for name, n in counts.most_common()),
        "max_score": f"{max(d['score'] for d in dets):.4f}" if dets else "",
        "tiled": int(doc["tiled"]),
        "total_ms": doc["timings_ms"].get("total", ""),
        "image_path": image["path"] or "",
        "image_status": status,
        "detections_json": json.dumps(dets, separators=(",", ":")),
    }


def _filters(args: argparse.Namespace) -> QueryFilters:
    """Raises: ValueError naming the option of a time that does not parse."""
    times = []
    for name in ("since", "until"):
        value = getattr(args, name)
        try:
            times.append(parse_time(value) if value is not None else None)
        except ValueError as exc:
            raise ValueError(f"--{name}: {exc}") from None
    return QueryFilters(args.camera_id, args.part_id, args.verdict, args.class_name, times[0], times[1])


def _rows(reader: RecordReader, filters: QueryFilters, limit: int | None) -> Iterator[dict[str, Any]]:
    left = limit
    cursor: str | None = None
    while left is None or left > 0:
        page, cursor = reader.query(filters, 1000 if left is None else min(left, 1000), cursor)
        yield from page
        left = None if left is None else left - len(page)
        if cursor is None:
            break


def _export(reader: RecordReader, args: argparse.Namespace, filters: QueryFilters, out: IO[str]) -> int:
    count = 0
    rows = _rows(reader, filters, args.limit)
    if args.format == "csv":
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for doc in rows:
            writer.writerow(csv_row(doc))
            count += 1
    else:
        for doc in rows:
            out.write(json.dumps(doc, ensure_ascii=False) + "\n")
            count += 1
    sys.stderr.write(f"aoi records: {count} record(s) exported\n")
    return 0


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


def run(args: argparse.Namespace) -> int:
    db = args.data_dir / DB_NAME
    filters = None
    if args.records_command == "export":
        if args.limit is not None and args.limit < 1:
            return _error(f"--limit: must be >= 1, got {args.limit}")
        try:
            filters = _filters(args)
        except ValueError as exc:
            return _error(str(exc))
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
        with contextlib.ExitStack() as stack:
            out = sys.stdout
            if args.out is not None:
                out = stack.enter_context(args.out.open("w", encoding="utf-8", newline=""))
            assert filters is not None
            return _export(reader, args, filters, out)
    except OSError as exc:
        return _error(f"{exc.filename or args.out}: cannot write ({exc.strerror or exc})")
    except sqlite3.Error as exc:
        return _error(f"{db}: {exc}")
    finally:
        conn.close()
