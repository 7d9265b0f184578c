"""usage per turn, the session's running cost, the audit table

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

USAGE_COLUMNS = (
    ("input_tokens", sa.Integer()),
    ("output_tokens", sa.Integer()),
    ("cache_creation_input_tokens", sa.Integer()),
    ("cache_read_input_tokens", sa.Integer()),
    ("cost_usd", sa.Float()),
    ("duration_ms", sa.Integer()),
)


def upgrade() -> None:
    with op.batch_alter_table("turns", schema=None) as batch_op:
        for name, kind in USAGE_COLUMNS:
            batch_op.add_column(sa.Column(name, kind, nullable=True))
        batch_op.create_index("ix_turns_ended_at", ["ended_at"], unique=False)
    with op.batch_alter_table("loops", schema=None) as batch_op:
        batch_op.add_column(sa.Column("session_cost_usd", sa.Float(), nullable=True))
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("loop_id", sa.String(length=64), nullable=True),
        sa.Column("turn_id", sa.String(length=64), nullable=True),
        sa.Column("person_id", sa.String(length=200), nullable=True),
        sa.Column("person_name", sa.String(length=200), nullable=True),
        sa.Column("source", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_at"), ["at"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_loop_id"), ["loop_id"], unique=False)


def downgrade() -> None:
    op.drop_table("audit")
    with op.batch_alter_table("loops", schema=None) as batch_op:
        batch_op.drop_column("session_cost_usd")
    with op.batch_alter_table("turns", schema=None) as batch_op:
        batch_op.drop_index("ix_turns_ended_at")
        for name, _ in USAGE_COLUMNS:
            batch_op.drop_column(name)
