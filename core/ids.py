"""Prefixed identifiers: `loop_…`, `turn_…`, `choice_…`, `tok_…`."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime


def new_id(prefix: str, nbytes: int = 12) -> str:
    return f"{prefix}_{secrets.token_hex(nbytes)}"


def loop_id(raw: str) -> str:
    """Accept a loop id with or without its prefix."""
    return raw if raw.startswith("loop_") else f"loop_{raw}"


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(moment: datetime) -> datetime:
    """SQLite hands datetimes back without their zone; every stored time is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
