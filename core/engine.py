"""The engine's API: loops, turns, events, choices and history, for one user at a time."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import claude_agent_sdk
from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from core import audit, budgets, files, metrics
from core.accounts import Accounts
from core.budgets import Refusal
from core.config import Settings
from core.errors import EngineError
from core.events import Event, EventStream, Overflow, Subscription
from core.ids import aware, loop_id, new_id, utcnow
from core.quotas import Admission, Quotas
from core.runtime import (
    RESERVE_IDS,
    SERVER_STOPPED,
    Context,
    LoopRuntime,
    LoopSpec,
    Turn,
    agent_env_from,
    sandbox_spec,
)
from core.sandbox import LocalSandbox, Sandbox, choose_sandbox
from core.sandbox.base import branch_problem
from core.storage import Database, EventLogUnavailable, EventWriter, private_dir
from core.tables import events, idempotency, loops, turns
from core.tasks import spawn
from core.usage import Usage, UsageSum, day_key, group

if TYPE_CHECKING:
    from core.replicas import Replicas

log = logging.getLogger(__name__)

IDEMPOTENCY_WINDOW = timedelta(hours=24)
REPLAY_BATCH = 500
LOGGED_HISTORY = ("assistant_delta", "tool_call", "tool_result")
ATTACHMENTS_LIMIT = 20
# Built once: a statement built per call costs ~0.2 ms before it reaches the database.
INSERT_TURN = insert(turns)
INSERT_IDEMPOTENCY = insert(idempotency)
USAGE_GROUPS = ("day", "loop", "author")
USAGE_COLUMNS = [turns.c[f.name] for f in fields(Usage)]
Author = dict[str, str]


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


class BudgetRefused(Exception):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


@dataclass
class TurnStream:
    """The events of one turn, live or replayed; `replayed` when an earlier POST ran it."""

    turn_id: str
    events: EventStream
    replayed: bool = False


def bundled_cli() -> Path:
    return Path(claude_agent_sdk.__file__).parent / "_bundled" / "claude"


class Engine:
    def __init__(self, settings: Settings, sandbox: Sandbox | None = None) -> None:
        self.settings = settings
        self.db = Database(settings.resolved_database_url)
        self.accounts = Accounts(self.db)
        self.writer = EventWriter(self.db)
        self.sandbox: Sandbox = sandbox or LocalSandbox(settings.data_dir, self.cli_path)
        self._choose_sandbox = sandbox is None
        self._runtimes: dict[str, LoopRuntime] = {}
        self._opening: dict[str, asyncio.Lock] = {}
        self.quotas = Quotas(settings, self._runtimes)
        self._purger: asyncio.Task[None] | None = None
        # Runtimes dropped from memory giving back their unused event ids.
        self._releases: set[asyncio.Task[None]] = set()
        self.ready = False
        # [ext] Several replicas: on PostgreSQL, loops have one owner among the replicas
        # (core/replicas). None on SQLite: nothing of it touches the single process.
        self.replicas: Replicas | None = None
        if self.db.engine.dialect.name == "postgresql":
            from core.replicas import Replicas

            self.replicas = Replicas(self)

    @property
    def cli_path(self) -> Path:
        return self.settings.cli_path or bundled_cli()

    # ---- life cycle ---------------------------------------------------------------

    async def start(self) -> None:
        private_dir(self.settings.data_dir)
        if self._choose_sandbox:
            self.sandbox = await choose_sandbox(self.settings, self.cli_path)
        await self.db.migrate()
        self.writer.start()
        await self.sandbox.start()
        if self.replicas is not None:
            await self.replicas.start()
        await self._recover()
        self._purger = spawn(self._purge_idempotency(), "idempotency-purge")
        metrics.watch_engine(self._agents_running, self._streams_open, self._choices_pending)
        self.ready = True

    async def readiness(self) -> str | None:
        """Why the engine cannot take work now (its database, its event log), or None."""
        if not self.ready:
            return "the engine is starting or stopping"
        try:
            await self.db.ping()
        except Exception as exc:
            return f"the database does not answer: {type(exc).__name__}: {exc}"
        return self.writer.problem

    async def close(self) -> None:
        self.ready = False
        if self._purger is not None:
            self._purger.cancel()
        for runtime in list(self._runtimes.values()):
            await runtime.close(archived=False)
        self._runtimes.clear()
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        await self.writer.close()
        if self.replicas is not None:  # after the writer: the last events are in the log
            await self.replicas.close()
        await self.sandbox.close()
        await self.db.close()

    async def _purge_idempotency(self) -> None:
        """Drop idempotency records past their window, now and then every hour."""
        while True:
            try:
                async with self.db.write() as conn:
                    cutoff = utcnow() - IDEMPOTENCY_WINDOW
                    await conn.execute(delete(idempotency).where(idempotency.c.created_at < cutoff))
            except Exception:  # tried again in an hour; expired records are refused meanwhile
                log.exception("dropping expired idempotency records failed")
            await asyncio.sleep(3600)

    async def _recover(self) -> None:
        """Turns a stopped server left open end with an `error` event, in the log too; their
        history keeps what the log holds of them. [ext] With several replicas, only the
        loops whose owner is gone (core/replicas) are touched."""
        if self.replicas is not None:
            await self.replicas.recover()
            return
        async with self.db.write() as conn:
            await end_open_turns(conn)

    # ---- loops ----------------------------------------------------------------------

    async def create_loop(
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
            new_id("loop"), title, now, user, False, None, metadata or {}, profiles, vault, repo,
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

    async def list_loops(
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
            rows = (await conn.execute(query.limit(limit + 1))).all()
        has_more = len(rows) > limit
        rows = rows[:limit]
        if before and not after:
            rows.reverse()
        data = [_loop_from_row(row) for row in rows]
        return Page(data, has_more, data[0].id if data else None, data[-1].id if data else None)

    async def get_loop(self, user: str, raw_id: str) -> Loop:
        loop = _loop_from_row(await self._owned_row(user, raw_id))
        runtime = self._runtimes.get(loop.id)
        loop.usage = (await self._loop_usage(loop.id, runtime)).totals()
        if runtime is not None:
            loop.turn_count = runtime.spec.turn_count
            loop.busy = runtime.busy
            loop.queue_depth = len(runtime.queue)
            turn = runtime.current
            if turn is not None:
                loop.current_turn = {
                    "turn_id": turn.id,
                    "started_at": turn.started_at,
                    "pending_choice_id": turn.pending_choice_id,
                }
        return loop

    async def _loop_usage(self, loop: str, runtime: LoopRuntime | None) -> UsageSum:
        """The loop's totals: stored turns, and ended turns whose row is still being written."""
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

    async def archive_loop(self, user: str, raw_id: str) -> None:
        row = await self._owned_row(user, raw_id)
        if row.archived:
            return
        async with self.db.write() as conn:
            await conn.execute(
                update(loops)
                .where(loops.c.id == row.id)
                .values(archived=True, archived_at=utcnow())
            )
        runtime = self._runtimes.pop(row.id, None)
        if runtime is not None:
            runtime.spec.archived = True
            await runtime.close(archived=True)
        await self.sandbox.remove(row.id)

    async def _owned_row(self, user: str, raw_id: str) -> Any:
        async with self.db.engine.connect() as conn:
            row = (await conn.execute(select(loops).where(loops.c.id == loop_id(raw_id)))).first()
        if row is None:
            raise EngineError("loop_not_found", f"no loop {raw_id}")
        if row.created_by != user:
            raise EngineError("not_loop_owner", "this loop belongs to another user")
        return row

    async def _runtime(self, row: Any) -> LoopRuntime:
        runtime = self._runtimes.get(row.id)
        if runtime is not None:
            return runtime
        lock = self._opening.setdefault(row.id, asyncio.Lock())
        async with lock:
            runtime = self._runtimes.get(row.id)
            if runtime is None:
                if self.replicas is not None:  # [ext] only the loop's owner runs it
                    await self.replicas.claim(row.id)
                # Numbering goes on above every id that may have been published (a runtime
                # dropped or a server killed may have published more than the log holds),
                # and the next block of ids is reserved before any is used.
                async with self.db.write() as conn:
                    seq = await _newest_id(conn, row.id)
                    reserved = seq + RESERVE_IDS
                    await conn.execute(
                        update(loops)
                        .where(loops.c.id == row.id)
                        .values(event_id_reserved=reserved)
                    )
                    fresh = (await conn.execute(select(loops).where(loops.c.id == row.id))).first()
                spec = LoopSpec(
                    fresh.id,
                    fresh.created_by,
                    fresh.archived,
                    fresh.session_id,
                    fresh.turn_count,
                    list(fresh.profiles),
                    fresh.vault,
                    fresh.repo,
                    fresh.branch,
                    fresh.session_cost_usd,
                )
                runtime = LoopRuntime(self._context(), spec, seq, reserved)
                self._runtimes[row.id] = runtime
        self._opening.pop(row.id, None)
        return runtime

    def _context(self) -> Context:
        return Context(
            settings=self.settings,
            db=self.db,
            writer=self.writer,
            sandbox=self.sandbox,
            agent_env=agent_env_from(os.environ, os.geteuid() == 0),
            forget=self._forget,
            budget_gate=self._budget_gate if self.settings.budgets.any else None,
        )

    def _forget(self, runtime: LoopRuntime) -> None:
        if runtime.quiet and self._runtimes.get(runtime.id) is runtime:
            del self._runtimes[runtime.id]
            runtime.dispose()
            release = spawn(runtime.release_ids(), f"loop {runtime.id}: release_ids")
            self._releases.add(release)
            release.add_done_callback(self._releases.discard)

    async def _caught_up(self) -> None:
        """Wait until the event log holds every event published so far; `not_ready` (503)
        when it cannot, rather than a reader that waits forever."""
        try:
            await self.writer.flush()
        except EventLogUnavailable as exc:
            raise EngineError("not_ready", f"{exc}; try again later (see /readyz)") from None

    # ---- turns ---------------------------------------------------------------------

    async def send(
        self,
        user: str,
        raw_id: str,
        content: str,
        permission_mode: str | None = None,
        idempotency_key: str | None = None,
        author: dict[str, str] | None = None,
        attachments: list[str] | None = None,
    ) -> TurnStream:
        runtime = await self._owned_runtime(user, raw_id)
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
            await self._usage_saved()
        admission = self.quotas.admission(user, runtime, len(content.encode()))
        try:
            turn, earlier = await self._record_turn(
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
            turn, earlier = None, await self._idempotent_turn(user, idempotency_key, request_hash)
        finally:
            admission.release()  # no wait from here on: the turn is counted in its queue
        if earlier is not None:
            return await self._replay_turn(*earlier)
        assert turn is not None
        subscription = runtime.channel.subscribe(lambda e: e.turn_id == turn.id)
        runtime.enqueue(turn)
        return TurnStream(turn.id, EventStream(self._until_terminal(runtime, subscription)))

    async def check_owner(self, user: str, raw_id: str) -> None:
        """`loop_not_found` or `not_loop_owner`, answered from memory when the loop is active."""
        runtime = self._runtimes.get(loop_id(raw_id))
        if runtime is None or runtime.spec.owner != user:
            await self._owned_row(user, raw_id)

    async def _owned_runtime(self, user: str, raw_id: str) -> LoopRuntime:
        """The loop's runtime, after the owner check (from memory when the loop is active)."""
        runtime = self._runtimes.get(loop_id(raw_id))
        if runtime is not None and runtime.spec.owner == user:
            return runtime
        return await self._runtime(await self._owned_row(user, raw_id))

    async def _record_turn(
        self,
        user: str,
        runtime: LoopRuntime,
        content: str,
        mode: str,
        key: str | None,
        request_hash: str,
        admission: Admission,
        author: dict[str, str] | None,
        attachments: list[dict[str, str]] | None = None,
    ) -> tuple[Turn | None, tuple[str, str] | None]:
        """Store a new turn with its idempotency record, in one transaction; or, when the key
        was seen before, the (loop, turn) it ran. A new turn must pass the caps first, and
        its budgets: a spent one raises `BudgetRefused` (after the key's check: a repeated
        request replays whatever the budgets say)."""
        async with self.db.write() as conn:
            if key is not None:
                earlier = await self._earlier_turn(conn, user, key, request_hash)
                if earlier is not None:
                    return None, earlier
            if self.settings.budgets.any:
                person = (author or {}).get("id") or user
                refusal = await budgets.check(
                    conn, self.settings.budgets, user=user, author=person, loop=runtime.id,
                    now=utcnow(),
                )
                if refusal is not None:
                    raise BudgetRefused(refusal)
            admission.take()
            turn = runtime.new_turn(content, mode, author=author, size=admission.size)
            turn.attachments = attachments or []
            if key is not None:
                record = {"user_id": user, "key": key, "request_hash": request_hash,
                          "loop_id": runtime.id, "turn_id": turn.id, "created_at": utcnow()}
                await conn.execute(INSERT_IDEMPOTENCY, record)
            await conn.execute(INSERT_TURN, turn.new_row(runtime.id, "queued"))
        return turn, None

    async def _usage_saved(self) -> None:
        """Wait until every ended turn's usage is stored, so budgets count it."""
        for runtime in list(self._runtimes.values()):
            saves = [t.end_saved for t in runtime.unsaved.values() if t.end_saved is not None]
            if saves:
                await asyncio.gather(*saves, return_exceptions=True)

    async def _budget_gate(self, user: str, author: str, loop: str, turn_id: str) -> Refusal | None:
        """Asked before a queued turn starts: a budget may have run out while it waited."""
        await self._usage_saved()
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
        detail = {"budget": refusal.budget, "cap_usd": refusal.cap, "spent_usd": refusal.spent,
                  "message": refusal.message}
        person = author if author and author.get("id") else {"id": user}
        await audit.record(
            self.db, "budget", user=user, loop=loop, turn_id=turn_id, person=person,
            detail=detail,
        )

    async def _idempotent_turn(
        self, user: str, key: str | None, request_hash: str
    ) -> tuple[str, str] | None:
        async with self.db.write() as conn:
            return await self._earlier_turn(conn, user, key or "", request_hash)

    @staticmethod
    async def _earlier_turn(
        conn: Any, user: str, key: str, request_hash: str
    ) -> tuple[str, str] | None:
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
        return row.loop_id, row.turn_id

    async def _replay_turn(self, loop: str, turn_id: str) -> TurnStream:
        runtime = self._runtimes.get(loop)
        live = runtime.channel.subscribe(lambda e: e.turn_id == turn_id) if runtime else None
        try:
            await self._caught_up()
        except EngineError:
            if live is not None:
                live.close()
            raise
        return TurnStream(turn_id, EventStream(self._replay(loop, turn_id, live)), replayed=True)

    async def _replay(
        self, loop: str, turn_id: str, live: Subscription | None
    ) -> AsyncIterator[list[Event]]:
        last = 0
        try:
            async for batch in self._logged(loop, after=0, turn_id=turn_id):
                last = batch[-1].seq or last
                ended = _through_terminal(batch)
                yield ended
                if len(ended) < len(batch) or ended[-1].terminal:
                    return
            if live is None:
                return
            async for batch in live.batches():
                fresh = _through_terminal([e for e in batch if (e.seq or 0) > last])
                if fresh:
                    yield fresh
                    if fresh[-1].terminal:
                        return
        finally:
            if live is not None:
                live.close()

    async def _until_terminal(
        self, runtime: LoopRuntime, subscription: Subscription
    ) -> AsyncIterator[list[Event]]:
        try:
            async for batch in subscription.batches():
                ended = _through_terminal(batch)
                yield ended
                if ended[-1].terminal:
                    return
        finally:
            subscription.close()
            self._forget(runtime)

    async def _logged(
        self, loop: str, after: int, turn_id: str | None = None
    ) -> AsyncIterator[list[Event]]:
        while True:
            query = select(events).where(events.c.loop_id == loop, events.c.seq > after)
            if turn_id is not None:
                query = query.where(events.c.turn_id == turn_id)
            async with self.db.engine.connect() as conn:
                rows = (await conn.execute(query.order_by(events.c.seq).limit(REPLAY_BATCH))).all()
            if rows:
                yield [Event.from_row(r.name, r.data, r.seq, r.turn_id) for r in rows]
            if len(rows) < REPLAY_BATCH:
                return
            after = rows[-1].seq

    async def watch(self, user: str, raw_id: str, last_event_id: int | None = None) -> EventStream:
        """Every event of the loop from now on (or after `last_event_id`), until closed."""
        row = await self._owned_row(user, raw_id)
        if self.replicas is not None and row.id not in self._runtimes:
            # [ext] a loop this replica does not run is followed in the shared event log
            return await self.replicas.follow(row.id, last_event_id)
        runtime = await self._runtime(row)
        if last_event_id is not None and last_event_id > runtime.seq:
            raise EngineError(
                "invalid_last_event_id",
                f"Last-Event-ID {last_event_id} is ahead of this loop's newest event {runtime.seq}",
            )
        # Subscribe and take the snapshot in one step, so no event falls between them.
        subscription = runtime.channel.subscribe()
        start: list[Event] = []
        if last_event_id is None:
            snapshot = runtime.snapshot()
            start = [snapshot] if snapshot is not None else []
        else:
            try:  # before the stream opens, so that failing is an answer, not a cut stream
                await self._caught_up()
            except EngineError:
                subscription.close()
                self._forget(runtime)
                raise
        return EventStream(self._watch(runtime, subscription, start, last_event_id))

    async def _watch(
        self,
        runtime: LoopRuntime,
        subscription: Subscription,
        start: list[Event],
        last_event_id: int | None,
    ) -> AsyncIterator[list[Event]]:
        last = runtime.seq if last_event_id is None else last_event_id
        try:
            if start:
                yield start
            if last_event_id is not None:
                async for batch in self._logged(runtime.id, after=last_event_id):
                    last = batch[-1].seq or last
                    yield batch
            async for batch in subscription.batches():
                if (batch[0].seq or 0) <= last:  # overlaps what came from the log or snapshot
                    batch = [e for e in batch if (e.seq or 0) > last]
                if batch:
                    yield batch
        except Overflow:
            return
        finally:
            subscription.close()
            self._forget(runtime)

    async def answer_choice(
        self,
        user: str,
        raw_id: str,
        choice_id: str,
        body: dict[str, Any],
        source: str = "api",
        by: Author | None = None,
    ) -> None:
        """Answer a pending choice; `by` is the person who answered, when the caller says."""
        row = await self._owned_row(user, raw_id)
        runtime = self._runtimes.get(row.id)
        if runtime is None:
            raise EngineError("choice_not_found", f"no pending choice {choice_id}")
        turn, choice, answer = runtime.answer(choice_id, body, source, by)
        detail: dict[str, Any] = {"choice_id": choice.id, "answer": answer}
        if choice.kind == "permission":
            detail |= {"tool": choice.payload["tool"],
                       "input_summary": choice.payload["input_summary"]}
        else:
            detail["questions"] = [q.get("question") for q in choice.payload["questions"]]
        await audit.record(
            self.db, choice.kind, user=user, loop=row.id, turn_id=turn.id,
            person=by or {"id": user}, source=source, detail=detail,
        )

    async def interrupt(
        self, user: str, raw_id: str, source: str = "api", by: Author | None = None
    ) -> None:
        row = await self._owned_row(user, raw_id)
        runtime = self._runtimes.get(row.id)
        turn = runtime.current if runtime is not None else None
        if runtime is not None:
            await runtime.interrupt()
        if turn is not None:
            await audit.record(
                self.db, "interrupt", user=user, loop=row.id, turn_id=turn.id,
                person=by or {"id": user}, source=source,
            )

    async def usage_report(
        self, user: str, since: datetime, until: datetime, group_by: str
    ) -> UsageReport:
        """The usage of the caller's own loops' turns that ended in [since, until)."""
        if group_by not in USAGE_GROUPS:
            raise EngineError("invalid_usage_query", "group_by must be day, loop or author")
        if since > until:  # an empty window is fine: it counts nothing
            raise EngineError("invalid_usage_query", "since must not be after until")
        await self._usage_saved()
        query = (
            select(
                turns.c.loop_id, turns.c.author_id, turns.c.ended_at, loops.c.created_by,
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

    async def history(
        self, user: str, raw_id: str, limit: int = 20, after: str | None = None
    ) -> HistoryPage:
        row = await self._owned_row(user, raw_id)
        query = select(turns).where(turns.c.loop_id == row.id)
        # Turns in memory now or once the rows are read: a turn that ends meanwhile may
        # have a stale row but is still the object that holds its final state.
        before = self._runtimes.get(row.id)
        live = _live_turns(before)
        if before is None:
            await self.writer.flush()  # the log's newest id must be on disk
        async with self.db.engine.connect() as conn:
            stored_seq = await conn.scalar(
                select(func.coalesce(func.max(events.c.seq), 0)).where(events.c.loop_id == row.id)
            )
            if after is not None:
                number = await conn.scalar(
                    select(turns.c.number).where(turns.c.id == after, turns.c.loop_id == row.id)
                )
                if number is None:
                    raise EngineError("invalid_cursor", f"no turn {after} in this loop")
                query = query.where(turns.c.number > number)
            rows = (await conn.execute(query.order_by(turns.c.number).limit(limit + 1))).all()
        # From here to the return nothing awaits: the items and the event id agree.
        runtime = self._runtimes.get(row.id) or before
        live.update(_live_turns(runtime))
        items = [_history_item(r, live.get(r.id)) for r in rows[:limit]]
        return HistoryPage(
            items,
            len(rows) > limit,
            items[0].turn_id if items else None,
            items[-1].turn_id if items else None,
            last_event_id=runtime.seq if runtime is not None else stored_seq,
        )

    # ---- files [ext] ---------------------------------------------------------------------

    async def workdir(self, user: str, raw_id: str, *, write: bool = False) -> Path:
        """The loop's working directory on this host, after the owner check. To write, the
        loop must not be archived, and the directory is made (its repo cloned) if no turn
        has made it yet."""
        row = await self._owned_row(user, raw_id)
        if write and row.archived:
            raise EngineError("loop_archived", "loop is archived: its files are read-only")
        workdir = self.sandbox.workdir(row.id)
        if write and not workdir.is_dir():
            spec = sandbox_spec(self.settings, row.id, {}, row.repo, row.branch)
            await self.sandbox.prepare_dirs(spec)
        return workdir

    async def _check_attachments(self, loop: str, paths: list[str]) -> list[dict[str, str]]:
        """Each attachment is a file of the working directory; images within the limit."""
        if len(paths) > ATTACHMENTS_LIMIT:
            raise EngineError(
                "too_many_attachments", f"at most {ATTACHMENTS_LIMIT} attachments a message"
            )
        if not paths:
            return []
        return await asyncio.to_thread(
            files.check_attachments, self.sandbox.workdir(loop), paths
        )

    def _agents_running(self) -> int:
        return sum(1 for runtime in self._runtimes.values() if runtime.agent is not None)

    def _streams_open(self) -> int:
        return sum(runtime.channel.subscriber_count for runtime in self._runtimes.values())

    def _choices_pending(self) -> int:
        return sum(
            len(runtime.current.pending)
            for runtime in self._runtimes.values()
            if runtime.current is not None
        )

    async def wait_idle(self) -> None:
        """Wait until every write of every runtime is done (tests and shutdown)."""
        for runtime in list(self._runtimes.values()):
            await runtime.settle()
        await self.writer.flush()


def _through_terminal(batch: list[Event]) -> list[Event]:
    """The batch up to and including its first terminal event."""
    for index, event in enumerate(batch):
        if event.terminal:
            return batch[: index + 1]
    return batch


async def end_open_turns(conn: Any, loop: str | None = None) -> list[str]:
    """End the open turns (of every loop, or of one) that no runtime runs any more with an
    `error` event, in the log too; their history keeps what the log holds of them. Each
    error takes an id above every id the stopped runtime may have published (its
    reservation). The ids of the loops touched."""
    query = select(turns.c.id, turns.c.loop_id).where(turns.c.ended.in_(("queued", "running")))
    if loop is not None:
        query = query.where(turns.c.loop_id == loop)
    rows = (await conn.execute(query.order_by(turns.c.loop_id, turns.c.number))).all()
    for row in rows:
        seq = await _newest_id(conn, row.loop_id) + 1
        data = {"code": "agent_failed", "message": SERVER_STOPPED, "turn_id": row.id}
        await conn.execute(
            insert(events).values(
                loop_id=row.loop_id,
                seq=seq,
                turn_id=row.id,
                name="error",
                data=json.dumps(data, separators=(",", ":")),
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


async def _newest_id(conn: Any, loop: str) -> int:
    """The highest event id the loop may have published: its reservation or its log's newest."""
    reserved = await conn.scalar(select(loops.c.event_id_reserved).where(loops.c.id == loop))
    logged = await conn.scalar(
        select(func.coalesce(func.max(events.c.seq), 0)).where(events.c.loop_id == loop)
    )
    return max(reserved or 0, logged or 0)


async def _logged_turn(conn: Any, turn_id: str) -> dict[str, Any]:
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


def _loop_from_row(row: Any) -> Loop:
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
