"""``aoi records export-dataset --reviewed``: the reviewed images and boxes of the station's records as a YOLO
dataset that ``aoi train --data`` takes unchanged (:mod:`service.records.dataset`; docs/review.md, "Back to
training"). Reads ``<data-dir>/records.sqlite3`` and the archive without changing them."""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path
from typing import Any

from service.cli.tables import add_data_dir, since_until
from service.core.bundle import BundleError, load_bundle
from service.records.dataset import DatasetExportError, DatasetOptions, ExportReport, ReviewFilters, export_reviewed
from service.records.schema import DB_NAME, RecordsSchemaError, open_reader

__all__ = ["add_export_dataset", "run_export_dataset"]


def add_export_dataset(sub: Any) -> None:
    """The ``export-dataset`` action of ``aoi records`` (``sub``: its subparsers)."""
    action: argparse.ArgumentParser = sub.add_parser(
        "export-dataset", help="reviewed images and boxes as a YOLO dataset for aoi train (docs/review.md)"
    )
    action.add_argument(
        "--reviewed",
        action="store_true",
        required=True,
        help="export the reviewed images with their reviewed boxes (the one source there is)",
    )
    action.add_argument("--out", type=Path, required=True, help="dataset folder to create (new or empty)")
    action.add_argument("--force", action="store_true", help="replace an earlier export-dataset output at --out")
    action.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help="the model bundle whose classes name the label ids (default: the class ids and names "
        "the records hold, which must name every class)",
    )
    action.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of images in val, whole parts at a time (default 0.2; 0: val = train)",
    )
    action.add_argument("--seed", type=int, default=0, help="seed of the part split (default 0)")
    action.add_argument("--camera-id", default=None)
    action.add_argument("--part-id", default=None)
    action.add_argument("--model-version", default=None, help="images the model of this version judged")
    action.add_argument("--since", default=None, help="received at or after: ISO 8601 (UTC unless given) or epoch s")
    action.add_argument("--until", default=None, help="received before (same forms)")
    add_data_dir(action)


def _error(message: str) -> int:
    sys.stderr.write(f"aoi records export-dataset: error: {message}\n")
    return 2


def _options(args: argparse.Namespace) -> DatasetOptions:
    """Raises: ValueError naming the option that does not parse; BundleError for a bad --bundle."""
    since, until = since_until(args)
    names = load_bundle(args.bundle, verify_hashes=False).classes if args.bundle is not None else None
    filters = ReviewFilters(args.camera_id, args.part_id, since, until, args.model_version)
    return DatasetOptions(args.out, filters, names, args.val_fraction, args.seed, args.force)


def _print_report(report: ExportReport) -> None:
    split = f"train {report.count('train')}, val {report.count('val')}" if report.count("val") else "train only"
    boxes = sum(int(i["labels"]) for i in report.images)
    print(
        f"exported {report.count()} reviewed image(s) to {report.out}: {split} (parts kept together), "
        f"{boxes} box(es), {report.count(negatives=True)} negative(s) (no defect: empty label files)"
    )
    print(f"classes ({len(report.class_names)}): {', '.join(report.class_names)}")
    if report.skipped:
        reasons = "; ".join(f"{n} {why}" for why, n in report.skipped_by_reason().items())
        print(f"skipped {len(report.skipped)} reviewed image(s) (only archived images can be exported): {reasons}")
    if report.duplicates:
        print(f"left out {len(report.duplicates)} duplicate image(s): the same bytes (sha256) as a newer decision")
    if report.skipped_decisions:
        print(f"not exported: {report.skipped_decisions} image(s) whose decision is 'skipped'")
    if report.filtered_out:
        print(f"outside the filters: {report.filtered_out} reviewed image(s)")
    if report.dropped_boxes:
        print(f"dropped {report.dropped_boxes} reviewed box(es) lying wholly outside their image")
    print(f"manifest: {report.out / 'manifest.json'}; train with: aoi train --data {report.out / 'data.yaml'}")


def run_export_dataset(args: argparse.Namespace) -> int:
    try:
        opts = _options(args)
    except ValueError as exc:
        return _error(str(exc))
    except BundleError as exc:
        return _error(f"--bundle: {exc}")
    db = args.data_dir / DB_NAME
    try:
        conn = open_reader(db)
    except RecordsSchemaError as exc:
        return _error(str(exc))
    try:
        report = export_reviewed(conn, args.data_dir, db, opts)
    except DatasetExportError as exc:
        return _error(str(exc))
    except OSError as exc:
        return _error(f"{exc.filename or args.out}: cannot write ({exc.strerror or exc})")
    except sqlite3.Error as exc:
        return _error(f"{db}: {exc}")
    finally:
        conn.close()
    _print_report(report)
    return 0
