"""How `aoi records` writes what it read, from the station's SQLite or the plant's PostgreSQL alike: records as CSV
(a spreadsheet row each) or JSON lines, and NG-rate and review rows as a table, JSON or CSV; and the options its
actions share (``--data-dir``, ``--since`` / ``--until``)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from service.records.query import parse_time

__all__ = ["CSV_COLUMNS", "csv_row", "export_rows", "stats_keys", "stats_table"]

CSV_COLUMNS = (
    "seq", "received_at", "request_id", "image_index", "camera_id", "part_id", "filename", "verdict", "detections",
    "classes", "max_score", "model_name", "model_version", "model_hash", "backend", "precision", "width", "height",
    "tiled", "tiles", "total_ms", "image_bytes", "image_sha256", "image_path", "image_status", "detections_json",
    "station_id", "line_id",
)  # fmt: skip


def csv_row(doc: dict[str, Any]) -> dict[str, Any]:
    """One record as a spreadsheet row: detections summarised (``classes`` ``scratches:2;pitted_surface:1`` by count,
    ``max_score``) and kept whole in ``detections_json``; times as ISO 8601 UTC."""
    dets = doc["detections"]
    counts = Counter(d["class_name"] for d in dets)
    image = doc["image"]
    if image is None:  # the central store: the station archived no image
        path, status = None, "not archived"
    elif "state" in image:  # the central store: pending upload, stored, or missing
        path, status = image["object_key"], image["state"]
    else:
        path = image["path"]
        status = "kept" if image["kept"] else (f"deleted ({image['deleted_reason']})" if path else "not archived")
    received = doc["received_at"]
    return {
        **{k: doc[k] for k in CSV_COLUMNS if k in doc and k != "detections"},
        "received_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(received)) + f".{int(received % 1 * 1000):03d}Z",
        "detections": len(dets),
        "classes": ";".join(f"{name}:{n}" for name, n in counts.most_common()),
        "max_score": f"{max(d['score'] for d in dets):.4f}" if dets else "",
        "tiled": int(doc["tiled"]),
        "total_ms": doc["timings_ms"].get("total", ""),
        "image_path": path or "",
        "image_status": status,
        "detections_json": json.dumps(dets, separators=(",", ":")),
    }


def export_rows(rows: Iterable[dict[str, Any]], args: argparse.Namespace, out: IO[str]) -> int:
    """Write ``rows`` (station or central records) as CSV or JSON lines, as ``args.format`` says."""
    count = 0
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


def stats_table(
    rows: Sequence[dict[str, Any]], keys: Sequence[str], fmt: str, out: IO[str], counts: Sequence[str] | None = None
) -> None:
    """NG-rate rows (``bucket``, the keys, ``total``, ``ng``, ``ng_rate``), or with ``counts`` the keys and those
    columns (the review stats), as an aligned table, JSON or CSV; a ``*_rate`` column with four decimals."""
    columns = ["bucket", *keys, "total", "ng", "ng_rate"] if counts is None else [*keys, *counts]
    if fmt == "json":
        out.write(json.dumps(list(rows), indent=2, ensure_ascii=False) + "\n")
        return
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return
    cells = [columns] + [
        [f"{r[c]:.4f}" if c.endswith("_rate") else ("" if r.get(c) is None else str(r.get(c))) for c in columns]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")


def stats_keys(args: argparse.Namespace) -> list[str]:
    """The ``--by`` keys of ``aoi records stats`` (station or plant), with the default of its kind (``--reviews``:
    model_version)."""
    by = args.by if args.by is not None else "model_version" if args.reviews else "camera_id,class_name"
    return [k.strip() for k in by.split(",") if k.strip()]


def add_data_dir(action: argparse.ArgumentParser) -> None:
    """``--data-dir``: the station's data folder, as the service finds it."""
    action.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("AOI_DATA_DIR") or "data"),
        help="the service's data_dir (default: $AOI_DATA_DIR, else data)",
    )


def since_until(args: argparse.Namespace) -> tuple[float | None, float | None]:
    """``--since`` and ``--until`` in epoch seconds (None when not given).

    Raises:
        ValueError: naming the option whose time does not parse.
    """
    times: list[float | None] = []
    for name in ("since", "until"):
        value = getattr(args, name)
        try:
            times.append(parse_time(value) if value is not None else None)
        except ValueError as exc:
            raise ValueError(f"--{name}: {exc}") from None
    return times[0], times[1]
