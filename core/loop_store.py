"""The loops table: making, listing, reading (with the owner check) and archiving loops."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, insert, or_, select, update

from core.config import Settings
from core.errors import EngineError
from core.ids import aware, loop_id, new_id, utcnow
from core.sandbox.base import branch_problem
from core.storage import Database
from core.tables import loops


@dataclass
class Loop:
    id: str
    title: str
    created_at: datetime
    created_by: str
    archived: bool
    archived_at: datetime | None
    metadata: dict[str, Any]
    profiles: list[str]
    vault: str
    repo: str | None
    branch: str | None = None  # [ext] the branch its repo's clone is on
    turn_count: int = 0
    active_at: datetime | None = None
    busy: bool = False
    queue_depth: int = 0
    current_turn: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None


@dataclass
class Page:
    data: list[Any]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class LoopStore:
    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db

    async def create(
        self,
        user: str,
        title: str = "untitled",
        metadata: dict[str, Any] | None = None,
        profiles: list[str] | None = None,
        vault: str = "default",
        repo: str | None = None,
        branch: str | None = None,
    ) -> Loop:
        profiles = profiles or []
        self.settings.check_access(user, profiles, vault, repo)
        if branch is not None:
            if repo is None:
                raise EngineError("invalid_branch", "a branch needs a repo")
            if (problem := branch_problem(branch)) is not None:
                raise EngineError("invalid_branch", f"branch {branch!r} {problem}")
        if repo is not None:
            branch = branch or self.settings.repos[repo].branch
        now = utcnow()
        loop = Loop(
            new_id("loop"),
            title,
            now,
            user,
            False,
            None,
            metadata or {},
            profiles,
            vault,
            repo,
            branch,
            active_at=now,
        )
        async with self.db.write() as conn:
            await conn.execute(
                insert(loops).values(
                    id=loop.id,
                    title=title,
                    created_by=user,
                    created_at=now,
                    active_at=now,
                    archived=False,
                    metadata=loop.metadata,
                    profiles=profiles,
                    vault=vault,
                    repo=repo,
                    branch=branch,
                    turn_count=0,
                    event_id_reserved=0,
                )
            )
        return loop

    async def page(
        self,
        user: str,
        limit: int = 20,
        after: str | None = None,
        before: str | None = None,
        archived: bool = False,
        metadata: dict[str, str] | None = None,
    ) -> Page:
        query = select(loops).where(loops.c.created_by == user, loops.c.archived == archived)
        for key, value in (metadata or {}).items():
            if not key or '"' in key or "\x00" in key:  # they cannot stand in a JSON path
                raise EngineError("invalid_request", f"metadata filter key {key!r} is not usable")
            query = query.where(loops.c.metadata[key].as_string() == value)
        cursor_id = after or before
        async with self.db.engine.connect() as conn:
            if cursor_id is not None:
                cursor = (
                    await conn.execute(
                        select(loops.c.active_at, loops.c.id).where(
                            loops.c.id == loop_id(cursor_id), loops.c.created_by == user
                        )
                    )
                ).first()
                if cursor is None:
                    raise EngineError("invalid_cursor", f"no loop {cursor_id} to page from")
                newer = or_(
                    loops.c.active_at > cursor.active_at,
                    and_(loops.c.active_at == cursor.active_at, loops.c.id > cursor.id),
                )
                older = or_(
                    loops.c.active_at < cursor.active_at,
                    and_(loops.c.active_at == cursor.active_at, loops.c.id < cursor.id),
                )
                query = query.where(older if after else newer)
            if before and not after:
                query = query.order_by(loops.c.active_at.asc(), loops.c.id.asc())
            else:
                query = query.order_by(loops.c.active_at.desc(), loops.c.id.desc())
            rows = list((await conn.execute(query.limit(limit + 1))).all())
        has_more = len(rows) > limit
        rows = rows[:limit]
        if before and not after:
            rows.reverse()
        data = [loop_from_row(row) for row in rows]
        return Page(data, has_more, data[0].id if data else None, data[-1].id if data else None)

    async def owned_row(self, user: str, raw_id: str) -> Any:
        """The loop's row, once `user` is known to own it."""
        async with self.db.engine.connect() as conn:
            row = (await conn.execute(select(loops).where(loops.c.id == loop_id(raw_id)))).first()
        if row is None:
            raise EngineError("loop_not_found", f"no loop {raw_id}")
        if row.created_by != user:
            raise EngineError("not_loop_owner", "this loop belongs to another user")
        return row

    async def archive(self, row: Any) -> None:
        async with self.db.write() as conn:
            await conn.execute(
                update(loops)
                .where(loops.c.id == row.id)
                .values(archived=True, archived_at=utcnow())
            )


def loop_from_row(row: Any) -> Loop:
    return Loop(
        id=row.id,
        title=row.title,
        created_at=aware(row.created_at),
        created_by=row.created_by,
        archived=row.archived,
        archived_at=aware(row.archived_at) if row.archived_at else None,
        metadata=row.metadata,
        profiles=list(row.profiles),
        vault=row.vault,
        repo=row.repo,
        branch=row.branch,
        turn_count=row.turn_count,
        active_at=aware(row.active_at),
    )
