"""The SQLite schema of the inspection records and its migrations (``PRAGMA user_version``), and the two ways a
connection to it is opened: the store's writer (migrates, WAL) and readers (query only, never migrate).

docs/records.md describes the tables; change both together. A migration is appended to :data:`MIGRATIONS`, never
edited once released: a database at version ``n`` has had exactly the first ``n`` steps applied.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

__all__ = [
    "DB_NAME",
    "MIGRATIONS",
    "RecordsSchemaError",
    "apply_migrations",
    "open_reader",
    "open_side_writer",
    "open_writer",
]

DB_NAME = "records.sqlite3"

# Step 1: the records. One row per answered image; request_id is chosen by clients (X-Request-ID), so it is indexed,
# never unique. Detections sit in their own table (ordinal keeps their order) so a class filter is an index lookup.
_STEP_RECORDS = (
    """CREATE TABLE inspections (
        seq INTEGER PRIMARY KEY,
        request_id TEXT NOT NULL,
        image_index INTEGER NOT NULL,
        received_at REAL NOT NULL,
        camera_id TEXT,
        part_id TEXT,
        filename TEXT,
        model_name TEXT NOT NULL,
        model_version TEXT NOT NULL,
        model_hash TEXT NOT NULL,
        backend TEXT NOT NULL,
        precision TEXT NOT NULL,
        verdict TEXT NOT NULL CHECK (verdict IN ('OK', 'NG')),
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        image_sha256 TEXT NOT NULL,
        image_bytes INTEGER NOT NULL,
        tiled INTEGER NOT NULL,
        tiles INTEGER NOT NULL,
        timings_ms TEXT NOT NULL
    )""",
    "CREATE INDEX inspections_request_id ON inspections (request_id, image_index)",
    "CREATE INDEX inspections_camera_id ON inspections (camera_id, seq)",
    "CREATE INDEX inspections_part_id ON inspections (part_id, seq)",
    "CREATE INDEX inspections_verdict ON inspections (verdict, seq)",
    "CREATE INDEX inspections_received_at ON inspections (received_at)",
    """CREATE TABLE detections (
        inspection_seq INTEGER NOT NULL REFERENCES inspections (seq),
        ordinal INTEGER NOT NULL,
        class_id INTEGER NOT NULL,
        class_name TEXT NOT NULL,
        score REAL NOT NULL,
        x1 REAL NOT NULL,
        y1 REAL NOT NULL,
        x2 REAL NOT NULL,
        y2 REAL NOT NULL,
        PRIMARY KEY (inspection_seq, ordinal)
    ) WITHOUT ROWID""",
    "CREATE INDEX detections_class_name ON detections (class_name, inspection_seq)",
)

# Step 2: the image archive. One row per file under data_dir (the uploaded image, named by its sha256 and shared by
# every record of the same bytes, or the annotated copy of one record). Retention marks a row deleted (when, why)
# instead of removing it, so a record can say what happened to its image.
_STEP_ARCHIVE = (
    """CREATE TABLE archive_files (
        id INTEGER PRIMARY KEY,
        path TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL CHECK (kind IN ('image', 'annotated')),
        sha256 TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        created_at REAL NOT NULL,
        last_seen_at REAL NOT NULL,
        deleted_at REAL,
        deleted_reason TEXT
    )""",
    "CREATE INDEX archive_files_live_sha ON archive_files (sha256) WHERE deleted_at IS NULL",
    "CREATE INDEX archive_files_live_age ON archive_files (last_seen_at, id) WHERE deleted_at IS NULL",
    "ALTER TABLE inspections ADD COLUMN image_file_id INTEGER REFERENCES archive_files (id)",
    "ALTER TABLE inspections ADD COLUMN annotated_file_id INTEGER REFERENCES archive_files (id)",
)

# Step 3: the station's identity on every record (plant-wide records: the central store keys them by station and
# seq). Rows written before it have NULL.
_STEP_STATION = (
    "ALTER TABLE inspections ADD COLUMN station_id TEXT",
    "ALTER TABLE inspections ADD COLUMN line_id TEXT",
)

# Step 4: review decisions (docs/review.md). Every decision is a new row, never updated: the history is the table,
# and an image's current decision is its newest row that is not an 'undo' and that no 'undo' row points at.
# AUTOINCREMENT: a review_seq is never reused, even after retention deleted the newest rows (central keys reviews by
# (station_id, review_seq)).
_STEP_REVIEWS = (
    """CREATE TABLE reviews (
        review_seq INTEGER PRIMARY KEY AUTOINCREMENT,
        inspection_seq INTEGER NOT NULL REFERENCES inspections (seq),
        request_id TEXT NOT NULL,
        image_index INTEGER NOT NULL,
        decision TEXT NOT NULL CHECK (decision IN ('confirmed', 'false_call', 'corrected', 'skipped', 'undo')),
        boxes TEXT NOT NULL,
        reviewer TEXT NOT NULL,
        decided_at REAL NOT NULL,
        model_version TEXT NOT NULL,
        model_hash TEXT NOT NULL,
        undoes INTEGER REFERENCES reviews (review_seq)
    )""",
    # an image's decisions newest first (its current one, its history); the undo rows by what they undo
    "CREATE INDEX reviews_inspection ON reviews (inspection_seq, review_seq)",
    "CREATE INDEX reviews_undoes ON reviews (undoes) WHERE undoes IS NOT NULL",
    # the review queue: newest first within a verdict and a camera or a model version (docs/review.md, the queue)
    "CREATE INDEX inspections_verdict_camera ON inspections (verdict, camera_id, seq)",
    "CREATE INDEX inspections_verdict_model ON inspections (verdict, model_version, seq)",
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (_STEP_RECORDS, _STEP_ARCHIVE, _STEP_STATION, _STEP_REVIEWS)
"""Migration steps in order; after step ``i`` (1-based) the database's ``user_version`` is ``i``."""


class RecordsSchemaError(Exception):
    """The file is not a records database this code can use (newer version, not SQLite, unreadable)."""


def apply_migrations(conn: sqlite3.Connection, steps: Sequence[tuple[str, ...]] = MIGRATIONS) -> int:
    """Bring ``conn`` (autocommit mode) to ``len(steps)``, one transaction per step; return the version it had.

    Raises:
        RecordsSchemaError: the database is at a version above ``len(steps)`` (written by newer code).
    """
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > len(steps):
        raise RecordsSchemaError(
            f"schema version {version} is newer than this code knows ({len(steps)}); run the newer service"
        )
    for number, statements in enumerate(steps[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql in statements:
                conn.execute(sql)
            conn.execute(f"PRAGMA user_version = {number}")  # PRAGMA takes no parameters; number is ours
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return version


def _connect(path: Path) -> sqlite3.Connection:
    # Autocommit (isolation_level None): transactions are explicit BEGIN/COMMIT, so a group commit is exactly one.
    # check_same_thread off: the writer opens it in start() and hands it to its thread; readers are closed at close().
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    conn.row_factory = sqlite3.Row
    return conn


def open_writer(path: Path, synchronous: Literal["FULL", "NORMAL"]) -> sqlite3.Connection:
    """The one write connection: WAL journal, ``synchronous`` (FULL: each commit is on disk when it returns;
    NORMAL: the last commits may be lost with the machine, never corrupted), schema migrated to the latest version.

    Raises:
        RecordsSchemaError: not a SQLite database, or a newer schema.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = _connect(path)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RecordsSchemaError(f"{path}: cannot switch to WAL journal (got {mode})")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        apply_migrations(conn)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise RecordsSchemaError(f"{path}: not a usable records database ({exc})") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def open_side_writer(path: Path, busy_timeout_ms: int = 5000) -> sqlite3.Connection:
    """A second write connection beside the store's writer (review decisions: short transactions of their own). It
    never migrates (the writer did, at start) and waits up to ``busy_timeout_ms`` for the writer's lock: WAL lets
    readers go on meanwhile, SQLite lets one writer commit at a time.

    Raises:
        RecordsSchemaError: no such file, not SQLite, or a schema version other than the latest.
    """
    conn = open_reader(path)
    conn.execute("PRAGMA query_only=OFF")
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")  # PRAGMA takes no parameters; an int of ours
    return conn


def open_reader(path: Path) -> sqlite3.Connection:
    """A query-only connection to an existing records database at the latest schema version (never migrates:
    readers such as ``aoi records`` must not change a database the service owns).

    Raises:
        RecordsSchemaError: no such file, not SQLite, or a schema version other than the latest.
    """
    if not path.is_file():
        raise RecordsSchemaError(f"{path}: no records database here (the service creates it when records are on)")
    conn = _connect(path)
    try:
        conn.execute("PRAGMA query_only=ON")
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise RecordsSchemaError(f"{path}: not a records database ({exc})") from exc
    if version != len(MIGRATIONS):
        conn.close()
        what = "newer than this code" if version > len(MIGRATIONS) else "older; start the service once to migrate it"
        raise RecordsSchemaError(f"{path}: schema version {version}, expected {len(MIGRATIONS)} ({what})")
    return conn
