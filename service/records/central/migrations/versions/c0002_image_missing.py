"""NG images: a third state, ``missing``, for an image whose station file was deleted (by the station's retention)
before it was uploaded: it will never be stored, and the uploader must not try it again forever.

Revision ID: c0002
Revises: c0001
"""

from __future__ import annotations

from alembic import op

revision = "c0002"
down_revision = "c0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE images DROP CONSTRAINT images_state_check")
    op.execute("ALTER TABLE images ADD CONSTRAINT images_state_check CHECK (state IN ('pending', 'stored', 'missing'))")


def downgrade() -> None:
    op.execute("ALTER TABLE images DROP CONSTRAINT images_state_check")
    op.execute("UPDATE images SET state = 'pending' WHERE state = 'missing'")
    op.execute("ALTER TABLE images ADD CONSTRAINT images_state_check CHECK (state IN ('pending', 'stored'))")
