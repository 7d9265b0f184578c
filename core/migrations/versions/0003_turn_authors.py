"""the author of a turn's message: who the caller spoke for

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("turns", schema=None) as batch_op:
        batch_op.add_column(sa.Column("author_id", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("author_name", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("turns", schema=None) as batch_op:
        batch_op.drop_column("author_name")
        batch_op.drop_column("author_id")
