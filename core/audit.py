"""The audit trail: who approved or denied which tool call, who answered which question,
who interrupted a turn, and which messages a budget refused."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select

from core.ids import aware, loop_id, utcnow
from core.storage import Database
from core.tables import audit

KINDS = ("permission", "question", "interrupt", "budget")
INSERT_AUDIT = insert(audit)


@dataclass
class AuditEntry:
    at: datetime
    kind: str
    user: str
    loop_id: str | None
    turn_id: str | None
    person_id: str | None
    person_name: str | None
    source: str | None
    detail: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "at": self.at.isoformat().replace("+00:00", "Z")}


async def record(
    db: Database,
    kind: str,
    *,
    user: str,
    loop: str | None = None,
    turn_id: str | None = None,
    person: dict[str, Any] | None = None,
    source: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    person = person or {}
    row = {
        "at": utcnow(),
        "kind": kind,
        "user_id": user,
        "loop_id": loop,
        "turn_id": turn_id,
        "person_id": person.get("id"),
        "person_name": person.get("name"),
        "source": source,
        "detail": detail or {},
    }
    async with db.write() as conn:
        await conn.execute(INSERT_AUDIT, row)


async def entries(
    db: Database, *, since: datetime | None = None, loop: str | None = None
) -> list[AuditEntry]:
    """Oldest first."""
    query = select(audit).order_by(audit.c.at, audit.c.id)
    if since is not None:
        query = query.where(audit.c.at >= since)
    if loop is not None:
        query = query.where(audit.c.loop_id == loop_id(loop))
    async with db.engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [
        AuditEntry(
            aware(r.at),
            r.kind,
            r.user_id,
            r.loop_id,
            r.turn_id,
            r.person_id,
            r.person_name,
            r.source,
            r.detail,
        )
        for r in rows
    ]
