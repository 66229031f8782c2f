"""``aoi records export|stats --db``: the same questions asked of the plant's central PostgreSQL, across every
station. The connection string comes from ``--db`` (a libpq URL or ``key=value`` string; keep the password out of it:
libpq reads ``PGPASSWORD`` or ``~/.pgpass``) or, with ``--db central``, from the service's own settings in the
environment (``AOI_CENTRAL__DSN`` or the file named by ``AOI_CENTRAL__DSN_FILE``). Needs the ``plant`` extra."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.cli.tables import export_rows, stats_keys, stats_table
from service.records.central.settings import redact_dsn, scrub
from service.records.query import QueryFilters

if TYPE_CHECKING:
    import psycopg

__all__ = ["add_plant_arguments", "resolve_dsn", "run_plant"]


def add_plant_arguments(action: argparse.ArgumentParser) -> None:
    action.add_argument(
        "--db",
        default=None,
        metavar="DSN",
        help="read the plant's central PostgreSQL instead of --data-dir: a postgresql:// URL (password from "
        "PGPASSWORD or ~/.pgpass), or 'central' for $AOI_CENTRAL__DSN / $AOI_CENTRAL__DSN_FILE",
    )
    action.add_argument("--station-id", default=None, help="--db only: one station")
    action.add_argument("--line-id", default=None, help="--db only: one line")


def resolve_dsn(value: str) -> str:
    """The DSN ``--db`` names.

    Raises:
        ValueError: ``central`` without the environment that holds it, or an unreadable DSN file.
    """
    if value != "central":
        return value
    dsn = os.environ.get("AOI_CENTRAL__DSN")
    if dsn:
        return dsn
    file = os.environ.get("AOI_CENTRAL__DSN_FILE")
    if not file:
        raise ValueError("--db central: neither AOI_CENTRAL__DSN nor AOI_CENTRAL__DSN_FILE is set")
    try:
        return Path(file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"--db central: AOI_CENTRAL__DSN_FILE {file}: {exc.strerror or exc}") from None


def _error(message: str) -> int:
    sys.stderr.write(f"aoi records: error: {message}\n")
    return 2


def _pages(conn: psycopg.Connection[Any], filters: Any, limit: int | None) -> Iterator[dict[str, Any]]:
    from service.records.central.query import query_records

    left, cursor = limit, None
    while left is None or left > 0:
        page, cursor = query_records(conn, filters, 1000 if left is None else min(left, 1000), cursor)
        yield from page
        left = None if left is None else left - len(page)
        if cursor is None:
            break


def _run(conn: psycopg.Connection[Any], args: argparse.Namespace, filters: QueryFilters) -> int:
    from service.records.central.query import PlantFilters, ng_stats, review_stats
    from service.records.stats import REVIEW_COUNTS

    plant = PlantFilters.of(filters, station_id=args.station_id, line_id=args.line_id)
    if args.records_command == "stats":
        keys = stats_keys(args)
        try:
            if args.reviews:
                stats_table(review_stats(conn, keys, filters=plant), keys, args.format, sys.stdout, REVIEW_COUNTS)
                return 0
            rows = ng_stats(conn, keys, args.bucket, filters=plant)
        except ValueError as exc:
            return _error(f"--by / --bucket: {exc}")
        stats_table(rows, keys, args.format, sys.stdout)
        return 0
    with contextlib.ExitStack() as stack:
        out = sys.stdout
        if args.out is not None:
            out = stack.enter_context(args.out.open("w", encoding="utf-8", newline=""))
        return export_rows(_pages(conn, plant, args.limit), args, out)


def run_plant(args: argparse.Namespace, filters: QueryFilters) -> int:
    """``export`` or ``stats`` against the central store; every error names the store by its redacted DSN."""
    try:
        import psycopg
    except ModuleNotFoundError:
        return _error("--db needs the 'plant' extra (psycopg): pip install -e '.[plant]'")
    try:
        dsn = resolve_dsn(args.db)
    except ValueError as exc:
        return _error(str(exc))
    where = redact_dsn(dsn)
    try:
        with psycopg.connect(dsn, connect_timeout=10, autocommit=True) as conn:
            return _run(conn, args, filters)
    except psycopg.Error as exc:
        return _error(f"{where}: {scrub(str(exc).strip(), dsn)}")
    except OSError as exc:
        return _error(f"{exc.filename or args.out}: cannot write ({exc.strerror or exc})")
