"""The database schema (SQLAlchemy Core tables); Alembic migrations create and change it."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("id", String(64), primary_key=True),  # the user name
    Column("password_hash", String(256), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

tokens = Table(
    "tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("user_id", String(64), ForeignKey("users.id"), nullable=False, index=True),
    Column("hash", String(64), nullable=False, unique=True),
    Column("label", String(200), nullable=False, default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_used_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)

web_sessions = Table(
    "web_sessions",
    metadata,
    Column("hash", String(64), primary_key=True),
    Column("user_id", String(64), ForeignKey("users.id"), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)

loops = Table(
    "loops",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("title", String(200), nullable=False),
    Column("created_by", String(64), ForeignKey("users.id"), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("active_at", DateTime(timezone=True), nullable=False),
    Column("archived", Boolean, nullable=False, default=False),
    Column("archived_at", DateTime(timezone=True), nullable=True),
    Column("metadata", JSON, nullable=False),
    Column("profiles", JSON, nullable=False),
    Column("vault", String(200), nullable=False),
    Column("repo", String(200), nullable=True),
    Column("branch", String(200), nullable=True),
    Column("session_id", String(64), nullable=True),
    # The agent CLI's running cost total of that session, as last reported (see usage.py).
    Column("session_cost_usd", Float, nullable=True),
    Column("turn_count", Integer, nullable=False, default=0),
    # Event ids up to here may have been published: numbering goes on above it.
    Column("event_id_reserved", Integer, nullable=False, default=0),
    Index("ix_loops_owner_active", "created_by", "archived", "active_at"),
)

turns = Table(
    "turns",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("loop_id", String(64), ForeignKey("loops.id"), nullable=False),
    Column("number", Integer, nullable=False),
    Column("trigger", String(16), nullable=False),
    Column("user_text", Text, nullable=False),
    Column("permission_mode", String(32), nullable=True),
    # The person the caller spoke for (the message's `author`), when it named one.
    Column("author_id", String(200), nullable=True),
    Column("author_name", String(200), nullable=True),
    Column("assistant_text", Text, nullable=False, default=""),
    Column("tool_calls", JSON, nullable=False),
    Column("choices", JSON, nullable=False),
    Column("attachments", JSON, nullable=True),  # [{"path"}] the message named
    Column("files_shared", JSON, nullable=True),  # file_shared events' data
    Column("ended", String(16), nullable=False),  # queued | running | done | interrupted | error
    Column("error", JSON, nullable=True),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("ended_at", DateTime(timezone=True), nullable=True),
    # The turn's own usage, from the agent's result; null while running or when unknown.
    Column("input_tokens", Integer, nullable=True),
    Column("output_tokens", Integer, nullable=True),
    Column("cache_creation_input_tokens", Integer, nullable=True),
    Column("cache_read_input_tokens", Integer, nullable=True),
    Column("cost_usd", Float, nullable=True),
    Column("duration_ms", Integer, nullable=True),
    Index("ix_turns_loop_number", "loop_id", "number", unique=True),
    Index("ix_turns_ended_at", "ended_at"),
)

events = Table(
    "events",
    metadata,
    Column("loop_id", String(64), primary_key=True),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("turn_id", String(64), nullable=True, index=True),
    Column("name", String(32), nullable=False),
    Column("data", Text, nullable=False),  # the event's JSON, exactly as streamed
)

idempotency = Table(
    "idempotency",
    metadata,
    Column("user_id", String(64), primary_key=True),
    Column("key", String(256), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("loop_id", String(64), nullable=False),
    Column("turn_id", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
)

# Who decided what, for `loopbridge audit`: choice answers, interrupts, budget refusals.
audit = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False, index=True),
    Column("kind", String(32), nullable=False),  # permission | question | interrupt | budget
    Column("user_id", String(64), nullable=False),  # the API user (token owner)
    Column("loop_id", String(64), nullable=True, index=True),
    Column("turn_id", String(64), nullable=True),
    Column("person_id", String(200), nullable=True),  # who, when a surface names them
    Column("person_name", String(200), nullable=True),
    Column("source", String(64), nullable=True),
    Column("detail", JSON, nullable=False),
)

# [ext] Several replicas: the replica that owns each active loop (core/replicas/lease.py).
# Only the owner runs the loop's agent and writes its events and turns; `epoch` grows at
# every change of owner, and a lease not renewed by `expires_at` may be taken over.
loop_leases = Table(
    "loop_leases",
    metadata,
    Column("loop_id", String(64), primary_key=True),
    Column("replica_id", String(200), nullable=False),
    Column("internal_url", String(500), nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False, index=True),
)

# Requests per rate-limit key (a user) per minute, counted by every replica on PostgreSQL.
rate_windows = Table(
    "rate_windows",
    metadata,
    Column("key", String(300), primary_key=True),
    Column("minute", BigInteger, primary_key=True),  # minutes since the epoch
    Column("count", Integer, nullable=False),
)
