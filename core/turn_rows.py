"""The database writes of a loop's runtime, done off the event path and retried."""

from __future__ import annotations

import contextlib

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncConnection

from core.storage import Database
from core.tables import loops, turns
from core.turn import LoopSpec, Turn


class TurnRows:
    def __init__(self, db: Database, spec: LoopSpec) -> None:
        self._db = db
        self._spec = spec

    async def save_start(self, turn: Turn) -> None:
        loop = self._spec.id

        async def save(conn: AsyncConnection) -> None:
            if turn.trigger == "background":  # no request stored it before it began
                await conn.execute(turns.insert().values(**turn.new_row(loop, "running")))
            else:
                started = {"ended": "running", "started_at": turn.started_at}
                await conn.execute(turns.update().where(turns.c.id == turn.id).values(**started))
            await conn.execute(
                update(loops)
                .where(loops.c.id == loop)
                .values(active_at=turn.started_at, turn_count=self._spec.turn_count)
            )

        await self._db.write_retrying(save, f"loop {loop}: saving the start of {turn.id}")

    async def save_end(self, turn: Turn) -> None:
        # The start row must exist before the end updates it (background turns insert it).
        if turn.start_saved is not None:
            with contextlib.suppress(Exception):  # its failure is logged; the end is saved anyway
                await turn.start_saved
        usage = turn.usage.as_dict() if turn.usage is not None else {}
        end = (
            turns.update()
            .where(turns.c.id == turn.id)
            .values(
                ended=turn.ended,
                error=turn.error,
                ended_at=turn.ended_at,
                **usage,
                **turn.history_fields(),
            )
        )
        cost = update(loops).where(loops.c.id == self._spec.id)
        cost = cost.values(session_cost_usd=self._spec.session_cost)

        async def save(conn: AsyncConnection) -> None:
            await conn.execute(end)
            if turn.usage is not None:
                await conn.execute(cost)

        await self._db.write_retrying(save, f"loop {self._spec.id}: saving the end of {turn.id}")

    async def save_session_id(self, session_id: str) -> None:
        query = update(loops).where(loops.c.id == self._spec.id).values(session_id=session_id)

        async def save(conn: AsyncConnection) -> None:
            await conn.execute(query)

        await self._db.write_retrying(save, f"loop {self._spec.id}: saving its session id")
