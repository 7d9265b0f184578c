"""Request counts per minute that every replica on one PostgreSQL database shares.

Each replica's own token bucket (bridge/server/auth.py) keeps bursts in check; this adds
the cluster-wide bound, `rate_limit_per_minute` requests per key (a user) per calendar
minute across all replicas. A request never waits on the database: it is counted in
memory and refused against the cluster's total as last seen; a background task adds the
counts to one row per key and minute every SYNC_SECONDS and reads the totals back. So
the cluster may let through a little more than the limit, at most what the replicas
admit in one sync, and never less.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from sqlalchemy import delete
from sqlalchemy.dialects.postgresql import insert

from core.storage import Database
from core.tables import rate_windows
from core.tasks import spawn

log = logging.getLogger(__name__)

SYNC_SECONDS = 0.2
WINDOW_SECONDS = 60
RETRY_SECONDS = 2.0


def _minute(now: float) -> int:
    return int(now // WINDOW_SECONDS)


class SharedRates:
    def __init__(self, db: Database, per_minute: int) -> None:
        self.db = db
        self.limit = per_minute
        self._minute = _minute(time.time())
        self._pending: dict[str, int] = {}  # counted here, not yet in the table
        self._totals: dict[str, int] = {}  # the cluster's counts this minute, as last read
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def take(self, key: str) -> int | None:
        """Count one request of `key`; None when it may pass, else the seconds until the
        minute ends (when it will)."""
        now = time.time()
        minute = _minute(now)
        if minute != self._minute:
            self._minute = minute
            self._pending.clear()
            self._totals.clear()
        used = self._totals.get(key, 0) + self._pending.get(key, 0)
        if used >= self.limit:
            return max(1, int((minute + 1) * WINDOW_SECONDS - now) + 1)
        self._pending[key] = self._pending.get(key, 0) + 1
        if self._task is None:
            self._task = spawn(self._run(), "shared-rates")
        self._wake.set()
        return None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        swept = self._minute
        while True:
            await self._wake.wait()
            await asyncio.sleep(SYNC_SECONDS)  # a sync's worth of requests in one statement
            self._wake.clear()
            minute, counts = self._minute, self._pending
            self._pending = {}
            if not counts:
                continue
            try:
                totals = await self._add(minute, counts, sweep=swept != minute)
            except Exception as exc:  # counted again at the next sync; meanwhile local only
                log.warning("cannot share the request counts: %s", exc)
                if minute == self._minute:
                    for key, n in counts.items():
                        self._pending[key] = self._pending.get(key, 0) + n
                self._wake.set()
                await asyncio.sleep(RETRY_SECONDS)
                continue
            swept = minute
            if minute == self._minute:
                self._totals.update(totals)

    async def _add(self, minute: int, counts: dict[str, int], sweep: bool) -> dict[str, int]:
        rows = [{"key": key, "minute": minute, "count": n} for key, n in sorted(counts.items())]
        adding = insert(rate_windows).values(rows)
        statement = adding.on_conflict_do_update(
            index_elements=[rate_windows.c.key, rate_windows.c.minute],
            set_={"count": rate_windows.c.count + adding.excluded.count},
        ).returning(rate_windows.c.key, rate_windows.c.count)
        async with self.db.engine.begin() as conn:
            totals = {str(key): int(n) for key, n in await conn.execute(statement)}
            if sweep:  # the minutes before the last are of no use to anyone
                await conn.execute(delete(rate_windows).where(rate_windows.c.minute < minute - 1))
        return totals
