"""Review decisions (docs/review.md): every decision and undo of every station, keyed (station_id, review_seq) like
the records are by (station_id, seq), each pointing at the record it judged (deleted with it by the retention job).

Revision ID: c0003
Revises: c0002
"""

from __future__ import annotations

from alembic import op

revision = "c0003"
down_revision = "c0002"
branch_labels = None
depends_on = None

# decided_at is a timestamptz (the journal keeps epoch seconds); boxes is jsonb (the reviewed boxes, as the station
# stores them). Rows are never updated: a station's history of decisions, in its own review_seq order.
_REVIEWS = """
CREATE TABLE reviews (
    station_id text NOT NULL,
    review_seq bigint NOT NULL,
    inspection_seq bigint NOT NULL,
    request_id text NOT NULL,
    image_index integer NOT NULL,
    decision text NOT NULL CHECK (decision IN ('confirmed', 'false_call', 'corrected', 'skipped', 'undo')),
    boxes jsonb NOT NULL,
    reviewer text NOT NULL,
    decided_at timestamptz NOT NULL,
    model_version text NOT NULL,
    model_hash text NOT NULL,
    undoes bigint,
    forwarded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (station_id, review_seq),
    FOREIGN KEY (station_id, inspection_seq) REFERENCES inspections (station_id, seq) ON DELETE CASCADE
)"""

_INDEXES = (
    # an image's decisions (its current one: the newest that is no undo and not undone)
    "CREATE INDEX reviews_inspection ON reviews (station_id, inspection_seq, review_seq)",
    "CREATE INDEX reviews_undoes ON reviews (station_id, undoes) WHERE undoes IS NOT NULL",
    "CREATE INDEX reviews_decided_at ON reviews (decided_at)",
)


def upgrade() -> None:
    for sql in (_REVIEWS, *_INDEXES):
        op.execute(sql)


def downgrade() -> None:
    op.execute("DROP TABLE reviews")
