"""[ext] several replicas: one owner per loop (its lease)

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "loop_leases",
        sa.Column("loop_id", sa.String(length=64), nullable=False),
        sa.Column("replica_id", sa.String(length=200), nullable=False),
        sa.Column("internal_url", sa.String(length=500), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("loop_id"),
    )
    op.create_index("ix_loop_leases_expires_at", "loop_leases", ["expires_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_loop_leases_expires_at", table_name="loop_leases")
    op.drop_table("loop_leases")
