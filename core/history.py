"""What happened in a loop: its turns as history items, and the usage of turns."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from core.active_loops import ActiveLoops
from core.errors import EngineError
from core.ids import aware
from core.loop_store import Page
from core.runtime import LoopRuntime
from core.storage import Database, EventWriter
from core.tables import events, loops, turns
from core.turn import Turn
from core.usage import Usage, UsageSum, day_key, group

USAGE_GROUPS = ("day", "loop", "author")
USAGE_COLUMNS = [turns.c[f.name] for f in fields(Usage)]


@dataclass
class HistoryPage(Page):
    # The newest event the page reflects: following the loop's events after it
    # continues the page with no gap and no repeat.
    last_event_id: int = 0


@dataclass
class HistoryItem:
    turn_id: str
    trigger: str
    user_text: str
    assistant_text: str
    tool_calls: list[dict[str, Any]]
    choices: list[dict[str, Any]]
    ended: str
    error: dict[str, str] | None
    started_at: datetime | None
    ended_at: datetime | None
    attachments: list[dict[str, str]]
    files_shared: list[dict[str, Any]]
    author: dict[str, str] | None = None
    pending_choice: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None


@dataclass
class UsageReport:
    data: list[dict[str, Any]]
    total: dict[str, Any]


class History:
    def __init__(self, db: Database, writer: EventWriter, active: ActiveLoops) -> None:
        self.db = db
        self.writer = writer
        self.active = active

    async def page(self, loop: str, limit: int = 20, after: str | None = None) -> HistoryPage:
        query = select(turns).where(turns.c.loop_id == loop)
        # Turns in memory now or once the rows are read: a turn that ends meanwhile may
        # have a stale row but is still the object that holds its final state.
        before = self.active.get(loop)
        live = _live_turns(before)
        if before is None:
            await self.writer.flush()  # the log's newest id must be on disk
        async with self.db.engine.connect() as conn:
            stored_seq = await conn.scalar(
                select(func.coalesce(func.max(events.c.seq), 0)).where(events.c.loop_id == loop)
            )
            if after is not None:
                number = await conn.scalar(
                    select(turns.c.number).where(turns.c.id == after, turns.c.loop_id == loop)
                )
                if number is None:
                    raise EngineError("invalid_cursor", f"no turn {after} in this loop")
                query = query.where(turns.c.number > number)
            rows = (await conn.execute(query.order_by(turns.c.number).limit(limit + 1))).all()
        # From here to the return nothing awaits: the items and the event id agree.
        runtime = self.active.get(loop) or before
        live.update(_live_turns(runtime))
        items = [_history_item(r, live.get(r.id)) for r in rows[:limit]]
        return HistoryPage(
            items,
            len(rows) > limit,
            items[0].turn_id if items else None,
            items[-1].turn_id if items else None,
            last_event_id=runtime.seq if runtime is not None else int(stored_seq or 0),
        )

    async def loop_usage(self, loop: str) -> UsageSum:
        """The loop's totals: stored turns, and ended turns whose row is still being written."""
        runtime = self.active.get(loop)
        unsaved = dict(runtime.unsaved) if runtime is not None else {}
        query = select(turns.c.id, *USAGE_COLUMNS).where(
            turns.c.loop_id == loop, turns.c.ended_at.is_not(None)
        )
        async with self.db.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        total = UsageSum()
        for row in rows:
            turn = unsaved.pop(row.id, None)
            total.add(turn.usage if turn is not None else Usage.from_row(row))
        for turn in unsaved.values():
            total.add(turn.usage)
        return total

    async def usage_report(
        self, user: str, since: datetime, until: datetime, group_by: str
    ) -> UsageReport:
        """The usage of the caller's own loops' turns that ended in [since, until)."""
        if group_by not in USAGE_GROUPS:
            raise EngineError("invalid_usage_query", "group_by must be day, loop or author")
        if since > until:  # an empty window is fine: it counts nothing
            raise EngineError("invalid_usage_query", "since must not be after until")
        await self.active.usage_saved()
        query = (
            select(
                turns.c.loop_id,
                turns.c.author_id,
                turns.c.ended_at,
                loops.c.created_by,
                *USAGE_COLUMNS,
            )
            .select_from(turns.join(loops, turns.c.loop_id == loops.c.id))
            .where(
                loops.c.created_by == user,
                turns.c.ended_at >= since,
                turns.c.ended_at < until,
            )
        )
        async with self.db.engine.connect() as conn:
            rows = (await conn.execute(query)).all()

        def key(row: Any) -> str:
            if group_by == "day":
                return day_key(aware(row.ended_at))
            if group_by == "loop":
                return str(row.loop_id)
            return str(row.author_id or row.created_by)

        data, total = group((key(row), Usage.from_row(row)) for row in rows)
        return UsageReport([item.as_dict() for item in data], total.as_dict())


def _live_turns(runtime: LoopRuntime | None) -> dict[str, Turn]:
    if runtime is None:
        return {}
    in_memory = [*([runtime.current] if runtime.current else []), *runtime.queue]
    return {**runtime.unsaved, **{t.id: t for t in in_memory}}


def _history_item(row: Any, turn: Turn | None) -> HistoryItem:
    """A history item from the stored row, or from memory while the turn is newer than it."""
    if turn is None:
        return HistoryItem(
            turn_id=row.id,
            trigger=row.trigger,
            user_text=row.user_text,
            assistant_text=row.assistant_text,
            tool_calls=row.tool_calls,
            choices=row.choices,
            ended=row.ended,
            error=row.error,
            started_at=aware(row.started_at) if row.started_at else None,
            ended_at=aware(row.ended_at) if row.ended_at else None,
            author={"id": row.author_id, "name": row.author_name} if row.author_id else None,
            attachments=row.attachments or [],
            files_shared=row.files_shared or [],
            usage=usage.as_dict() if (usage := Usage.from_row(row)) is not None else None,
        )
    ended = turn.ended or ("running" if turn.started_at else "queued")
    return HistoryItem(
        turn_id=turn.id,
        trigger=turn.trigger,
        user_text=turn.user_text,
        ended=ended,
        error=turn.error,
        started_at=turn.started_at,
        ended_at=turn.ended_at,
        author=turn.author,
        attachments=turn.attachments,
        pending_choice=turn.pending_choice,
        usage=turn.usage.as_dict() if turn.usage is not None else None,
        **turn.history_fields(),
    )
