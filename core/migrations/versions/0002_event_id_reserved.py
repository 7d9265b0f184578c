"""loops.last_seq (never used) becomes loops.event_id_reserved: event ids are reserved
in the database before they are published, so a crash never lets one be reused
(a loop's numbering goes on above both this and its newest logged event)

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("loops", schema=None) as batch_op:
        batch_op.alter_column("last_seq", new_column_name="event_id_reserved")


def downgrade() -> None:
    with op.batch_alter_table("loops", schema=None) as batch_op:
        batch_op.alter_column("event_id_reserved", new_column_name="last_seq")
