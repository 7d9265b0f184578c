"""Turns asked for: a message stored and queued (once per idempotency key, within the caps
and budgets), a choice answered, a turn interrupted."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError

from bridge.contract.models import PermissionMode
from core import audit, budgets, files, idempotency, metrics
from core.active_loops import ActiveLoops
from core.budgets import Refusal
from core.config import Settings
from core.errors import EngineError
from core.ids import utcnow
from core.quotas import Admission, Quotas
from core.runtime import LoopRuntime
from core.storage import Database
from core.streams import Streams, TurnStream
from core.tables import turns
from core.turn import Turn

ATTACHMENTS_LIMIT = 20
# Built once: a statement built per call costs ~0.2 ms before it reaches the database.
INSERT_TURN = insert(turns)
Author = dict[str, str]


class BudgetRefused(Exception):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


class Turns:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        active: ActiveLoops,
        streams: Streams,
        quotas: Quotas,
        workdir: Callable[[str], Path],
    ) -> None:
        self.settings = settings
        self.db = db
        self.active = active
        self.streams = streams
        self.quotas = quotas
        self._workdir = workdir

    async def send(
        self,
        user: str,
        runtime: LoopRuntime,
        content: str,
        permission_mode: PermissionMode | None = None,
        idempotency_key: str | None = None,
        author: Author | None = None,
        attachments: list[str] | None = None,
    ) -> TurnStream:
        if runtime.spec.archived:
            raise EngineError("loop_archived", "loop is archived")
        # The settings may have changed since the loop was made: its owner must still be allowed.
        spec = runtime.spec
        self.settings.check_access(user, spec.profiles, spec.vault, spec.repo)
        mode = permission_mode or self.settings.default_permission_mode
        attached = await self._check_attachments(runtime.id, attachments or [])
        # Without an author or attachments the hash is what it was before they existed,
        # so older records match.
        hashed: list[Any] = [runtime.id, content, permission_mode, *([author] if author else [])]
        if attached:
            hashed.append(attached)
        request_hash = hashlib.sha256(json.dumps(hashed).encode()).hexdigest()
        if self.settings.budgets.any:
            await self.active.usage_saved()
        admission = self.quotas.admission(user, runtime, len(content.encode()))
        turn: Turn | None = None
        try:
            turn, earlier = await self._record(
                user,
                runtime,
                content,
                mode,
                idempotency_key,
                request_hash,
                admission,
                author,
                attached,
            )
        except BudgetRefused as refused:
            await self._refused(refused.refusal, user, author, runtime.id, None)
            retry = refused.refusal.retry_after(utcnow())
            raise EngineError("budget_exceeded", refused.refusal.message, retry) from None
        except IntegrityError:
            # The same key raced in from another request: answer like the replay it is.
            async with self.db.write() as conn:
                key = idempotency_key or ""
                earlier = await idempotency.earlier_turn(conn, user, key, request_hash)
        finally:
            admission.release()  # no wait from here on: the turn is counted in its queue
        if earlier is not None:
            return await self.streams.replay_turn(*earlier)
        assert turn is not None
        turn_id = turn.id
        subscription = runtime.channel.subscribe(lambda e: e.turn_id == turn_id)
        runtime.enqueue(turn)
        return self.streams.new_turn(runtime, subscription, turn_id)

    async def _record(
        self,
        user: str,
        runtime: LoopRuntime,
        content: str,
        mode: PermissionMode,
        key: str | None,
        request_hash: str,
        admission: Admission,
        author: Author | None,
        attachments: list[dict[str, str]],
    ) -> tuple[Turn | None, tuple[str, str] | None]:
        """Store a new turn with its idempotency record, in one transaction; or, when the key
        was seen before, the (loop, turn) it ran. A new turn must pass the caps first, and
        its budgets: a spent one raises `BudgetRefused` (after the key's check: a repeated
        request replays whatever the budgets say)."""
        async with self.db.write() as conn:
            if key is not None:
                earlier = await idempotency.earlier_turn(conn, user, key, request_hash)
                if earlier is not None:
                    return None, earlier
            if self.settings.budgets.any:
                person = (author or {}).get("id") or user
                refusal = await budgets.check(
                    conn,
                    self.settings.budgets,
                    user=user,
                    author=person,
                    loop=runtime.id,
                    now=utcnow(),
                )
                if refusal is not None:
                    raise BudgetRefused(refusal)
            admission.take()
            turn = runtime.new_turn(content, mode, author=author, size=admission.size)
            turn.attachments = attachments
            if key is not None:
                await idempotency.record(conn, user, key, request_hash, runtime.id, turn.id)
            await conn.execute(INSERT_TURN, turn.new_row(runtime.id, "queued"))
        return turn, None

    async def _check_attachments(self, loop: str, paths: list[str]) -> list[dict[str, str]]:
        """Each attachment is a file of the working directory; images within the limit."""
        if len(paths) > ATTACHMENTS_LIMIT:
            raise EngineError(
                "too_many_attachments", f"at most {ATTACHMENTS_LIMIT} attachments a message"
            )
        if not paths:
            return []
        return await asyncio.to_thread(files.check_attachments, self._workdir(loop), paths)

    # ---- budgets ---------------------------------------------------------------------

    async def budget_gate(self, user: str, author: str, loop: str, turn_id: str) -> Refusal | None:
        """Asked before a queued turn starts: a budget may have run out while it waited."""
        await self.active.usage_saved()
        async with self.db.engine.connect() as conn:
            refusal = await budgets.check(
                conn, self.settings.budgets, user=user, author=author, loop=loop, now=utcnow()
            )
        if refusal is not None:
            await self._refused(refusal, user, {"id": author}, loop, turn_id)
        return refusal

    async def _refused(
        self, refusal: Refusal, user: str, author: Author | None, loop: str, turn_id: str | None
    ) -> None:
        metrics.BUDGET_REFUSALS.labels(refusal.budget).inc()
        detail = {
            "budget": refusal.budget,
            "cap_usd": refusal.cap,
            "spent_usd": refusal.spent,
            "message": refusal.message,
        }
        person = author if author and author.get("id") else {"id": user}
        await audit.record(
            self.db,
            "budget",
            user=user,
            loop=loop,
            turn_id=turn_id,
            person=person,
            detail=detail,
        )

    # ---- choices and interrupts ---------------------------------------------------------

    async def answer_choice(
        self,
        user: str,
        loop: str,
        choice_id: str,
        body: dict[str, Any],
        source: str,
        by: Author | None,
    ) -> None:
        """Answer a pending choice; `by` is the person who answered, when the caller says."""
        runtime = self.active.get(loop)
        if runtime is None:
            raise EngineError("choice_not_found", f"no pending choice {choice_id}")
        turn, choice, answer = runtime.answer(choice_id, body, source, by)
        detail: dict[str, Any] = {"choice_id": choice.id, "answer": answer}
        if choice.kind == "permission":
            detail |= {
                "tool": choice.payload["tool"],
                "input_summary": choice.payload["input_summary"],
            }
        else:
            detail["questions"] = [q.get("question") for q in choice.payload["questions"]]
        await audit.record(
            self.db,
            choice.kind,
            user=user,
            loop=loop,
            turn_id=turn.id,
            person=by or {"id": user},
            source=source,
            detail=detail,
        )

    async def interrupt(self, user: str, loop: str, source: str, by: Author | None) -> None:
        runtime = self.active.get(loop)
        turn = runtime.current if runtime is not None else None
        if runtime is not None:
            await runtime.interrupt()
        if turn is not None:
            await audit.record(
                self.db,
                "interrupt",
                user=user,
                loop=loop,
                turn_id=turn.id,
                person=by or {"id": user},
                source=source,
            )
