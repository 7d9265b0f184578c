"""The loops active in memory: a runtime per loop, opened on demand and dropped when quiet."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from core.config import Settings
from core.emitter import RESERVE_IDS
from core.ids import loop_id
from core.loop_store import LoopStore
from core.runtime import BudgetGate, Context, LoopRuntime
from core.sandbox import Sandbox
from core.sandbox.env import agent_env_from
from core.starts import StartGate
from core.storage import Database, EventWriter
from core.tables import events, loops
from core.tasks import spawn
from core.turn import LoopSpec

# The row an owner check read for this request (the server checks the owner before it
# reads the body): the send that follows starts the loop's runtime from it instead of
# reading it again. Used once; a row changed since is caught where the runtime starts.
_checked: ContextVar[Any] = ContextVar("checked_loop_row", default=None)


class ActiveLoops:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        writer: EventWriter,
        store: LoopStore,
        sandbox: Callable[[], Sandbox],
    ) -> None:
        self.settings = settings
        self.db = db
        self.writer = writer
        self.store = store
        self._sandbox = sandbox
        self.starts = StartGate(settings.max_starting)
        # Set when budgets are configured: asked again before a queued turn starts.
        self.budget_gate: BudgetGate | None = None
        # [ext] Set with several replicas: makes this replica the loop's owner before its
        # runtime starts here (core/replicas), or raises when another replica runs it.
        self.claim: Callable[[str], Awaitable[None]] | None = None
        self.runtimes: dict[str, LoopRuntime] = {}
        self._opening: dict[str, asyncio.Lock] = {}
        # Runtimes dropped from memory giving back their unused event ids.
        self._releases: set[asyncio.Task[None]] = set()

    def get(self, loop: str) -> LoopRuntime | None:
        return self.runtimes.get(loop)

    def holds(self, loop: str) -> bool:
        """Whether the loop's runtime is in memory here, or being started."""
        return loop in self.runtimes or loop in self._opening

    async def check_owner(self, user: str, raw_id: str) -> None:
        """`loop_not_found` or `not_loop_owner`, answered from memory when the loop is active."""
        runtime = self.runtimes.get(loop_id(raw_id))
        if runtime is None or runtime.spec.owner != user:
            _checked.set(await self.store.owned_row(user, raw_id))

    async def owned(self, user: str, raw_id: str) -> LoopRuntime:
        """The loop's runtime, after the owner check (from memory when the loop is active;
        else the row the owner check read is the one the runtime starts from)."""
        loop = loop_id(raw_id)
        runtime = self.runtimes.get(loop)
        if runtime is not None and runtime.spec.owner == user:
            return runtime
        row = _checked.get()
        _checked.set(None)
        if row is None or row.id != loop or row.created_by != user:
            row = await self.store.owned_row(user, raw_id)
        return await self.open(row)

    async def open(self, row: Any) -> LoopRuntime:
        """The runtime of the loop whose (owner-checked) row this is, started if need be."""
        runtime = self.runtimes.get(row.id)
        if runtime is not None:
            return runtime
        lock = self._opening.setdefault(row.id, asyncio.Lock())
        async with lock:
            runtime = self.runtimes.get(row.id)
            if runtime is None:
                if self.claim is not None:  # [ext] only the loop's owner runs it
                    await self.claim(row.id)
                runtime = await self._start(row, read_again=self.claim is not None)
                self.runtimes[row.id] = runtime
        self._opening.pop(row.id, None)
        return runtime

    async def _start(self, row: Any, read_again: bool = False) -> LoopRuntime:
        """Numbering goes on above every id that may have been published (a runtime dropped
        or a server killed may have published more than the log holds), and the next block
        of ids is reserved before any is used. The row the caller read is the runtime's
        spec unless the loop changed since (another runtime came and went, or it was
        archived): the reservation is only raised from the value that row holds, and
        otherwise the row is read again. [ext] With several replicas it is read again
        anyway, once claimed: another replica may have run the loop since."""
        async with self.db.write() as conn:
            if read_again:
                row = (await conn.execute(select(loops).where(loops.c.id == row.id))).one()
            seq = max(row.event_id_reserved or 0, await _newest_logged(conn, row.id))
            reserved = seq + RESERVE_IDS
            unchanged = (
                (loops.c.id == row.id)
                & (loops.c.event_id_reserved == row.event_id_reserved)
                & (loops.c.archived == row.archived)
            )
            raised = await conn.execute(
                update(loops).where(unchanged).values(event_id_reserved=reserved)
            )
            if raised.rowcount != 1:
                seq = await newest_id(conn, row.id)
                reserved = seq + RESERVE_IDS
                await conn.execute(
                    update(loops).where(loops.c.id == row.id).values(event_id_reserved=reserved)
                )
                row = (await conn.execute(select(loops).where(loops.c.id == row.id))).one()
        return LoopRuntime(self._context(), LoopSpec.from_row(row), seq, reserved)

    def _context(self) -> Context:
        return Context(
            settings=self.settings,
            db=self.db,
            writer=self.writer,
            sandbox=self._sandbox(),
            agent_env=agent_env_from(os.environ, os.geteuid() == 0),
            forget=self.forget,
            starts=self.starts,
            budget_gate=self.budget_gate,
        )

    def forget(self, runtime: LoopRuntime) -> None:
        """Drop a quiet runtime from memory; its unused event ids are given back."""
        if runtime.quiet and self.runtimes.get(runtime.id) is runtime:
            del self.runtimes[runtime.id]
            runtime.dispose()
            release = spawn(runtime.release_ids(), f"loop {runtime.id}: release_ids")
            self._releases.add(release)
            release.add_done_callback(self._releases.discard)

    async def close(self, loop: str) -> None:
        """The loop was archived: its runtime ends its turns `interrupted` and stops."""
        runtime = self.runtimes.pop(loop, None)
        if runtime is not None:
            runtime.spec.archived = True
            await runtime.close(archived=True)

    async def close_all(self) -> None:
        for runtime in list(self.runtimes.values()):
            await runtime.close(archived=False)
        self.runtimes.clear()
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)

    async def usage_saved(self) -> None:
        """Wait until every ended turn's usage is stored, so budgets and reports count it."""
        for runtime in list(self.runtimes.values()):
            saves = [t.end_saved for t in runtime.unsaved.values() if t.end_saved is not None]
            if saves:
                await asyncio.gather(*saves, return_exceptions=True)

    # ---- gauges ---------------------------------------------------------------------

    def agents_running(self) -> int:
        return sum(1 for runtime in self.runtimes.values() if runtime.agent is not None)

    def streams_open(self) -> int:
        return sum(runtime.channel.subscriber_count for runtime in self.runtimes.values())

    def choices_pending(self) -> int:
        return sum(
            len(runtime.current.pending)
            for runtime in self.runtimes.values()
            if runtime.current is not None
        )


async def _newest_logged(conn: AsyncConnection, loop: str) -> int:
    logged = await conn.scalar(
        select(func.coalesce(func.max(events.c.seq), 0)).where(events.c.loop_id == loop)
    )
    return int(logged or 0)


async def newest_id(conn: AsyncConnection, loop: str) -> int:
    """The highest event id the loop may have published: its reservation or its log's newest."""
    reserved = await conn.scalar(select(loops.c.event_id_reserved).where(loops.c.id == loop))
    return max(int(reserved or 0), await _newest_logged(conn, loop))
