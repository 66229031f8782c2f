"""Central records: inspections keyed (station_id, seq), detections, NG image references, plant query indexes.

Revision ID: c0001
Revises:
"""

from __future__ import annotations

from alembic import op

revision = "c0001"
down_revision = None
branch_labels = None
depends_on = None

# received_at is a timestamptz (the journal keeps epoch seconds); timings_ms is jsonb. The station's archive ids
# (image_file_id, annotated_file_id) are local to its disk: their central form is the images table.
_INSPECTIONS = """
CREATE TABLE inspections (
    station_id text NOT NULL,
    seq bigint NOT NULL,
    line_id text,
    request_id text NOT NULL,
    image_index integer NOT NULL,
    received_at timestamptz NOT NULL,
    camera_id text,
    part_id text,
    filename text,
    model_name text NOT NULL,
    model_version text NOT NULL,
    model_hash text NOT NULL,
    backend text NOT NULL,
    precision text NOT NULL,
    verdict text NOT NULL CHECK (verdict IN ('OK', 'NG')),
    width integer NOT NULL,
    height integer NOT NULL,
    image_sha256 text NOT NULL,
    image_bytes bigint NOT NULL,
    tiled boolean NOT NULL,
    tiles integer NOT NULL,
    timings_ms jsonb NOT NULL,
    forwarded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (station_id, seq)
)"""

# received_at and verdict are copied from the record (both immutable) so that class-over-time questions are answered
# from this table's covering index alone, without a join.
_DETECTIONS = """
CREATE TABLE detections (
    station_id text NOT NULL,
    seq bigint NOT NULL,
    ordinal integer NOT NULL,
    received_at timestamptz NOT NULL,
    verdict text NOT NULL,
    class_id integer NOT NULL,
    class_name text NOT NULL,
    score real NOT NULL,
    x1 real NOT NULL,
    y1 real NOT NULL,
    x2 real NOT NULL,
    y2 real NOT NULL,
    PRIMARY KEY (station_id, seq, ordinal),
    FOREIGN KEY (station_id, seq) REFERENCES inspections (station_id, seq) ON DELETE CASCADE
)"""

# One row per archived image of a record: 'pending' until the object is uploaded and its sha256 verified.
_IMAGES = """
CREATE TABLE images (
    station_id text NOT NULL,
    seq bigint NOT NULL,
    kind text NOT NULL CHECK (kind IN ('image', 'annotated')),
    object_key text NOT NULL,
    sha256 text NOT NULL,
    bytes bigint,
    state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'stored')),
    stored_at timestamptz,
    PRIMARY KEY (station_id, seq, kind),
    FOREIGN KEY (station_id, seq) REFERENCES inspections (station_id, seq) ON DELETE CASCADE
)"""

_INDEXES = (
    # newest-first pages over the whole plant: the keyset (received_at, station_id, seq) in index order
    "CREATE INDEX inspections_received_at ON inspections (received_at, station_id, seq)",
    "CREATE INDEX inspections_station_time ON inspections (station_id, received_at)",
    "CREATE INDEX inspections_line_time ON inspections (line_id, received_at)",
    "CREATE INDEX inspections_camera_time ON inspections (camera_id, received_at)",
    "CREATE INDEX inspections_part_time ON inspections (part_id, received_at)",
    "CREATE INDEX inspections_verdict_time ON inspections (verdict, received_at)",
    "CREATE INDEX inspections_request_id ON inspections (request_id, image_index)",
    "CREATE INDEX detections_class_time ON detections (class_name, received_at) INCLUDE (station_id, seq, verdict)",
    "CREATE INDEX images_pending ON images (station_id, seq) WHERE state = 'pending'",
)


def upgrade() -> None:
    for sql in (_INSPECTIONS, _DETECTIONS, _IMAGES, *_INDEXES):
        op.execute(sql)


def downgrade() -> None:
    for table in ("images", "detections", "inspections"):
        op.execute(f"DROP TABLE {table}")
