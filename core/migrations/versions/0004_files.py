"""files: a loop's branch, a turn's attachments and shared files

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("loops") as batch:
        batch.add_column(sa.Column("branch", sa.String(length=200), nullable=True))
    with op.batch_alter_table("turns") as batch:
        batch.add_column(sa.Column("attachments", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("files_shared", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("turns") as batch:
        batch.drop_column("files_shared")
        batch.drop_column("attachments")
    with op.batch_alter_table("loops") as batch:
        batch.drop_column("branch")
