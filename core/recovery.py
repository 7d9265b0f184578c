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
    history keeps what the log holds of them. The error takes an id above every id
    the stopped server may have published (its reservation)."""
    async with db.write() as conn:
        rows = (
            await conn.execute(
                select(turns.c.id, turns.c.loop_id)
                .where(turns.c.ended.in_(("queued", "running")))
                .order_by(turns.c.loop_id, turns.c.number)
            )
        ).all()
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
