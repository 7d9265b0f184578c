"""Idempotency records: a repeated `Idempotency-Key` replays the turn it first ran."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from core.errors import EngineError
from core.ids import aware, utcnow
from core.storage import Database
from core.tables import idempotency

log = logging.getLogger(__name__)

IDEMPOTENCY_WINDOW = timedelta(hours=24)
# Built once: a statement built per call costs ~0.2 ms before it reaches the database.
INSERT_IDEMPOTENCY = insert(idempotency)


async def earlier_turn(
    conn: AsyncConnection, user: str, key: str, request_hash: str
) -> tuple[str, str] | None:
    """The (loop, turn) the key ran within its window, or None; `idempotency_key_reused`
    when the key came with another request."""
    mine = (idempotency.c.user_id == user) & (idempotency.c.key == key)
    row = (await conn.execute(select(idempotency).where(mine))).first()
    if row is None:
        return None
    if aware(row.created_at) < utcnow() - IDEMPOTENCY_WINDOW:
        await conn.execute(delete(idempotency).where(mine))
        return None
    if row.request_hash != request_hash:
        raise EngineError(
            "idempotency_key_reused", "this Idempotency-Key was used with another request"
        )
    return str(row.loop_id), str(row.turn_id)


async def record(
    conn: AsyncConnection, user: str, key: str, request_hash: str, loop: str, turn_id: str
) -> None:
    await conn.execute(
        INSERT_IDEMPOTENCY,
        {
            "user_id": user,
            "key": key,
            "request_hash": request_hash,
            "loop_id": loop,
            "turn_id": turn_id,
            "created_at": utcnow(),
        },
    )


async def purge(db: Database) -> None:
    """Drop idempotency records past their window, now and then every hour."""
    while True:
        try:
            async with db.write() as conn:
                cutoff = utcnow() - IDEMPOTENCY_WINDOW
                await conn.execute(delete(idempotency).where(idempotency.c.created_at < cutoff))
        except Exception:  # tried again in an hour; expired records are refused meanwhile
            log.exception("dropping expired idempotency records failed")
        await asyncio.sleep(3600)
