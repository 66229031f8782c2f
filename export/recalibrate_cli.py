"""``aoi calibrate-reviews``: re-fit a bundle's per-class score thresholds from the review decisions in a station's
records (:mod:`export.recalibrate`), print what would change per class, and write the thresholds only when asked:
``--out DIR`` a copy of the bundle, ``--write`` the bundle itself (same format, a new version). No torch."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.cli import add_threshold_rule

if TYPE_CHECKING:
    from export.recalibrate import Recalibration
    from service.core.bundle import ModelBundle
    from service.records.reviews import ReviewedImage

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, required=True, help="the bundle whose model the reviews judged")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("AOI_DATA_DIR") or "data"),
        help="the station's data_dir holding records.sqlite3 (default: $AOI_DATA_DIR, else data)",
    )
    add_threshold_rule(parser, "recall over the reviewed defects")
    parser.add_argument(
        "--min-reviewed",
        type=int,
        default=10,
        metavar="N",
        help="a class with fewer reviewed detections keeps its threshold (default 10)",
    )
    parser.add_argument(
        "--match-version",
        action="store_true",
        help="use every review of the bundle's version, not only those of this exact bundle.json "
        "(its sha256): e.g. after --from-bundle added precisions",
    )
    parser.add_argument("--since", default=None, help="images received at or after (ISO 8601 or epoch s)")
    parser.add_argument("--until", default=None, help="images received before (same forms)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=None, help="write a copy of the bundle with the new thresholds")
    where.add_argument("--write", action="store_true", help="write the new thresholds into --bundle itself")
    parser.add_argument("--version", default=None, help="version of the written bundle (default <old>+reviews.<date>)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")


def _error(message: str) -> int:
    sys.stderr.write(f"aoi calibrate-reviews: error: {message}\n")
    return 2


def _check_args(args: argparse.Namespace) -> str | None:
    if args.target_recall is not None and not 0.0 < args.target_recall <= 1.0:
        return f"--target-recall: must be in (0, 1], got {args.target_recall}"
    if args.min_reviewed < 1:
        return f"--min-reviewed: must be >= 1, got {args.min_reviewed}"
    if args.out is not None and args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        return f"{args.out}: exists and is not an empty directory; choose a new one (or --write the bundle itself)"
    return None


def _reviews(args: argparse.Namespace, bundle: ModelBundle, bundle_hash: str) -> list[ReviewedImage]:
    """The current decisions on images this bundle's model judged (by bundle.json sha256, or version), in time.

    Raises:
        ValueError: a time that does not parse, or no such review (the message says which models were reviewed).
    """
    from service.records.query import parse_time
    from service.records.reviews import current_reviews
    from service.records.schema import DB_NAME, open_reader

    since, until = (parse_time(v) if v is not None else None for v in (args.since, args.until))
    conn = open_reader(args.data_dir / DB_NAME)
    try:
        every = list(current_reviews(conn))
    finally:
        conn.close()
    ours = [
        r
        for r in every
        if (r.model_version == bundle.version if args.match_version else r.model_hash == bundle_hash)
        and (since is None or r.received_at >= since)
        and (until is None or r.received_at < until)
    ]
    if not [r for r in ours if r.decision != "skipped"]:
        seen = sorted({f"{r.model_version} ({r.model_hash[:12]})" for r in every})
        which = f"version {bundle.version}" if args.match_version else f"bundle.json sha256 {bundle_hash[:12]}"
        hint = "" if args.match_version else "; --match-version takes every review of the version"
        raise ValueError(
            f"{args.data_dir / DB_NAME}: no reviewed image judged by {which} in the time range ({len(every)} "
            f"reviewed image(s) of {', '.join(seen) or 'no model'}){hint}"
        )
    return ours


def _version(old: str) -> str:
    return f"{old.split('+reviews.')[0]}+reviews.{time.strftime('%Y%m%d', time.gmtime())}"


def _write(
    args: argparse.Namespace, bundle: ModelBundle, result: Recalibration, bundle_hash: str, version: str
) -> Path:
    """The bundle with the new thresholds at ``--out`` (staged beside it, verified, renamed) or in ``--bundle``."""
    from export.recalibrate import updated_bundle
    from service.core.bundle import BUNDLE_FILE, load_bundle, write_bundle

    source: dict[str, Any] = {
        "data": args.data_dir.name,
        "mode": "recall" if args.target_recall else "f1",
        "target_recall": args.target_recall,
        "min_reviewed": args.min_reviewed,
        "matched": "version" if args.match_version else f"bundle.json {bundle_hash[:12]}",
    }
    new = updated_bundle(bundle, result, version, source)
    if args.write:
        write_bundle(new, args.bundle)
        load_bundle(args.bundle)
        return Path(args.bundle)
    out: Path = args.out
    stage = out.parent / f".{out.name}.partial"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        shutil.copytree(args.bundle, stage, ignore=lambda _d, names: [n for n in names if n == BUNDLE_FILE])
        write_bundle(new, stage)
        load_bundle(stage)
        if out.exists():
            out.rmdir()
        stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


def run(args: argparse.Namespace) -> int:
    from export.recalibrate import RecalibrationOptions, format_table, recalibrate
    from service.core.bundle import BUNDLE_FILE, BundleError, load_bundle, sha256_file
    from service.records.schema import RecordsSchemaError

    problem = _check_args(args)
    if problem:
        return _error(problem)
    try:
        bundle = load_bundle(args.bundle)
        bundle_hash = sha256_file(args.bundle / BUNDLE_FILE)
        reviews = _reviews(args, bundle, bundle_hash)
    except (BundleError, RecordsSchemaError, ValueError, sqlite3.Error) as exc:
        return _error(str(exc))
    if args.target_recall is not None:
        opts = RecalibrationOptions("recall", args.target_recall, args.min_reviewed)
    else:
        opts = RecalibrationOptions("f1", 0.9, args.min_reviewed)
    result = recalibrate(reviews, bundle, opts)
    if args.json:
        doc = {
            "bundle": str(args.bundle),
            "version": bundle.version,
            "images": result.images,
            "false_call_images": result.false_call_images,
            "defective_caught": result.defective_caught,
            "escapes_found": result.escapes_found,
            "per_class": {c.name: c.to_json() for c in result.classes},
        }
        print(json.dumps(doc, indent=2))
    else:
        print(f"bundle {bundle.name} {bundle.version} ({args.bundle}); reviews in {args.data_dir}, {opts.mode} rule\n")
        print(format_table(result))
    say = print if not args.json else lambda text: print(text, file=sys.stderr)
    if args.out is None and not args.write:
        say("\nnothing written: --out DIR writes a copy of the bundle with these thresholds, --write the bundle")
        return 0
    if not result.changed:
        say("\nno threshold changes: nothing written")
        return 0
    version = args.version or _version(bundle.version)
    try:
        written = _write(args, bundle, result, bundle_hash, version)
    except (BundleError, OSError) as exc:
        return _error(f"cannot write the bundle: {exc}")
    say(
        f"\nwrote {written / BUNDLE_FILE} (version {version}); load it with the service's swap (docs/service.md) "
        "or restart on it"
    )
    return 0
