"""The engine's API: loops, turns, events, choices and history, for one user at a time.

`Engine` is the composition the server calls: each method checks who asks and hands
the work to the part that holds it: the loops table (core/loop_store.py), the loops
active in memory (core/active_loops.py), turns and their idempotency (core/turns.py),
streams, replays and watches (core/streams.py), history and usage (core/history.py),
and at start the recovery of turns a stopped server left open (core/recovery.py).
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import claude_agent_sdk

from bridge.contract.models import PermissionMode
from core import idempotency, metrics
from core.accounts import Accounts
from core.active_loops import ActiveLoops
from core.advisory import clustered
from core.agent_slot import sandbox_spec
from core.config import Settings
from core.errors import EngineError
from core.events import EventStream
from core.history import History, HistoryItem, HistoryPage, UsageReport
from core.loop_store import Loop, LoopStore, Page, loop_from_row
from core.quotas import Quotas
from core.rates import SharedRates
from core.recovery import recover
from core.sandbox import LocalSandbox, Sandbox, choose_sandbox
from core.storage import Database, EventWriter, private_dir
from core.streams import Streams, TurnStream
from core.tasks import spawn
from core.turns import Author, BudgetRefused, Turns

if TYPE_CHECKING:
    from core.replicas import Replicas

__all__ = [
    "BudgetRefused",
    "Engine",
    "HistoryItem",
    "HistoryPage",
    "Loop",
    "Page",
    "TurnStream",
    "UsageReport",
    "bundled_cli",
]


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
        self.store = LoopStore(settings, self.db)
        self.active = ActiveLoops(settings, self.db, self.writer, self.store, lambda: self.sandbox)
        self._runtimes = self.active.runtimes
        self.quotas = Quotas(settings, self._runtimes)
        self.streams = Streams(self.db, self.writer, self.active)
        self.turns = Turns(
            settings,
            self.db,
            self.active,
            self.streams,
            self.quotas,
            lambda loop: self.sandbox.workdir(loop),
        )
        if settings.budgets.any:
            self.active.budget_gate = self.turns.budget_gate
        self.turn_history = History(self.db, self.writer, self.active)
        # Replicas share one database: the rate limit counts across them (core/rates.py).
        self.rates = (
            SharedRates(self.db, settings.rate_limit_per_minute)
            if clustered(self.db.engine)
            else None
        )
        self._purger: asyncio.Task[None] | None = None
        self.ready = False
        # [ext] Several replicas: on PostgreSQL, loops have one owner among the replicas
        # (core/replicas). None on SQLite: nothing of it touches the single process.
        self.replicas: Replicas | None = None
        if clustered(self.db.engine):
            from core.replicas import Replicas

            self.replicas = Replicas(self)
            self.active.claim = self.replicas.claim

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
            # [ext] only the loops whose owner is gone are recovered (core/replicas)
            await self.replicas.start()
            await self.replicas.recover()
        else:
            await recover(self.db)
        self._purger = spawn(idempotency.purge(self.db), "idempotency-purge")
        active = self.active
        metrics.watch_engine(active.agents_running, active.streams_open, active.choices_pending)
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
        await self.active.close_all()
        await self.writer.close()
        if self.replicas is not None:  # after the writer: the last events are in the log
            await self.replicas.close()
        if self.rates is not None:
            await self.rates.close()
        await self.sandbox.close()
        await self.db.close()

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
        return await self.store.create(user, title, metadata, profiles, vault, repo, branch)

    async def list_loops(
        self,
        user: str,
        limit: int = 20,
        after: str | None = None,
        before: str | None = None,
        archived: bool = False,
        metadata: dict[str, str] | None = None,
    ) -> Page:
        return await self.store.page(user, limit, after, before, archived, metadata)

    async def get_loop(self, user: str, raw_id: str) -> Loop:
        loop = loop_from_row(await self.store.owned_row(user, raw_id))
        loop.usage = (await self.turn_history.loop_usage(loop.id)).totals()
        runtime = self.active.get(loop.id)
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

    async def archive_loop(self, user: str, raw_id: str) -> None:
        row = await self.store.owned_row(user, raw_id)
        if row.archived:
            return
        await self.store.archive(row)
        await self.active.close(row.id)
        await self.sandbox.remove(row.id)

    async def check_owner(self, user: str, raw_id: str) -> None:
        """`loop_not_found` or `not_loop_owner`, answered from memory when the loop is active."""
        await self.active.check_owner(user, raw_id)

    # ---- turns ---------------------------------------------------------------------

    async def send(
        self,
        user: str,
        raw_id: str,
        content: str,
        permission_mode: PermissionMode | None = None,
        idempotency_key: str | None = None,
        author: Author | None = None,
        attachments: list[str] | None = None,
    ) -> TurnStream:
        runtime = await self.active.owned(user, raw_id)
        return await self.turns.send(
            user, runtime, content, permission_mode, idempotency_key, author, attachments
        )

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
        row = await self.store.owned_row(user, raw_id)
        await self.turns.answer_choice(user, row.id, choice_id, body, source, by)

    async def interrupt(
        self, user: str, raw_id: str, source: str = "api", by: Author | None = None
    ) -> None:
        row = await self.store.owned_row(user, raw_id)
        await self.turns.interrupt(user, row.id, source, by)

    # ---- events and history -----------------------------------------------------------

    async def watch(self, user: str, raw_id: str, last_event_id: int | None = None) -> EventStream:
        """Every event of the loop from now on (or after `last_event_id`), until closed."""
        if self.replicas is not None:
            row = await self.store.owned_row(user, raw_id)
            if self.active.get(row.id) is None:
                # [ext] a loop this replica does not run is followed in the shared event log
                return await self.replicas.follow(row.id, last_event_id)
            runtime = await self.active.open(row)
        else:
            runtime = await self.active.owned(user, raw_id)
        return await self.streams.watch(runtime, last_event_id)

    async def history(
        self, user: str, raw_id: str, limit: int = 20, after: str | None = None
    ) -> HistoryPage:
        row = await self.store.owned_row(user, raw_id)
        return await self.turn_history.page(row.id, limit, after)

    async def usage_report(
        self, user: str, since: datetime, until: datetime, group_by: str
    ) -> UsageReport:
        """The usage of the caller's own loops' turns that ended in [since, until)."""
        return await self.turn_history.usage_report(user, since, until, group_by)

    # ---- files [ext] ---------------------------------------------------------------------

    async def workdir(self, user: str, raw_id: str, *, write: bool = False) -> Path:
        """The loop's working directory on this host, after the owner check. To write, the
        loop must not be archived, and the directory is made (its repo cloned) if no turn
        has made it yet."""
        row = await self.store.owned_row(user, raw_id)
        if write and row.archived:
            raise EngineError("loop_archived", "loop is archived: its files are read-only")
        workdir = self.sandbox.workdir(row.id)
        if write and not workdir.is_dir():
            spec = sandbox_spec(self.settings, row.id, {}, row.repo, row.branch)
            await self.sandbox.prepare_dirs(spec)
        return workdir
