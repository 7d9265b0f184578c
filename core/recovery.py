"""At start: the turns a stopped server left open end with an `error` event."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.contract.events import ErrorEvent
from core.active_loops import newest_id
from core.ids import utcnow
from core.runtime import SERVER_STOPPED
from core.storage import Database
from core.tables import events, loops, turns

LOGGED_HISTORY = ("assistant_delta", "tool_call", "tool_result")


async def recover(db: Database) -> None:
    """Turns a stopped server left open end with an `error` event, in the log too; their
    history keeps what the log holds of them."""
    async with db.write() as conn:
        await end_open_turns(conn)


async def end_open_turns(conn: AsyncConnection, loop: str | None = None) -> list[str]:
    """End the open turns (of every loop, or of one) that no runtime runs any more with an
    `error` event, in the log too. Each error takes an id above every id the stopped
    runtime may have published (its reservation). The ids of the loops touched. [ext]
    Also what a replica runs when it takes over a dead replica's loop (core/replicas)."""
    query = select(turns.c.id, turns.c.loop_id).where(turns.c.ended.in_(("queued", "running")))
    if loop is not None:
        query = query.where(turns.c.loop_id == loop)
    rows = (await conn.execute(query.order_by(turns.c.loop_id, turns.c.number))).all()
    for row in rows:
        seq = await newest_id(conn, row.loop_id) + 1
        error = ErrorEvent(code="agent_failed", message=SERVER_STOPPED, turn_id=row.id)
        await conn.execute(
            insert(events).values(
                loop_id=row.loop_id,
                seq=seq,
                turn_id=row.id,
                name="error",
                data=json.dumps(error.model_dump(), separators=(",", ":")),
            )
        )
        await conn.execute(
            update(loops).where(loops.c.id == row.loop_id).values(event_id_reserved=seq)
        )
        logged = await _logged_turn(conn, row.id)
        await conn.execute(
            update(turns)
            .where(turns.c.id == row.id)
            .values(
                ended="error",
                error={"code": "agent_failed", "message": SERVER_STOPPED},
                ended_at=utcnow(),
                **logged,
            )
        )
    return sorted({row.loop_id for row in rows})


async def _logged_turn(conn: AsyncConnection, turn_id: str) -> dict[str, Any]:
    """A turn's history fields as its logged events tell them (text and tool calls)."""
    rows = await conn.execute(
        select(events.c.name, events.c.data)
        .where(events.c.turn_id == turn_id, events.c.name.in_(LOGGED_HISTORY))
        .order_by(events.c.seq)
    )
    text: list[str] = []
    tool_calls: dict[str, dict[str, Any]] = {}
    for name, raw in rows:
        data = json.loads(raw)
        if name == "assistant_delta":
            text.append(data["text"])
        elif name == "tool_call":
            tool_calls[data["tool_use_id"]] = {**data, "ok": None}
        elif data["tool_use_id"] in tool_calls:
            tool_calls[data["tool_use_id"]]["ok"] = data["ok"]
    return {"assistant_text": "".join(text), "tool_calls": list(tool_calls.values())}
