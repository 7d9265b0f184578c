"""PostgreSQL advisory locks: what replicas sharing one database do one at a time.

A transaction-level lock makes replicas that start together migrate the schema one
after the other. A session-level lock, held on a connection of its own, makes one
replica the leader of something (the embedded chat adapters), or the only process
running under a replica id, for as long as that connection lives: when the holder's
process dies, even by SIGKILL, its socket closes, PostgreSQL ends the session and the
lock is free for the next replica that asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

log = logging.getLogger(__name__)

# Keys of this application's locks (one bigint space per database): "lb" and a number.
MIGRATIONS_LOCK = 0x6C62_0001
ADAPTERS_LOCK = 0x6C62_0002

TRY_LOCK = text("SELECT pg_try_advisory_lock(:key)")
UNLOCK = text("SELECT pg_advisory_unlock(:key)")
XACT_LOCK = text("SELECT pg_advisory_xact_lock(:key)")
PING = text("SELECT 1")


def identity_key(replica_id: str) -> int:
    """The lock a running replica holds on its own id (a signed 64-bit key)."""
    digest = hashlib.sha256(f"loopbridge replica {replica_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def clustered(engine: AsyncEngine) -> bool:
    """Whether replicas may share this database (PostgreSQL); SQLite is one process's."""
    return engine.dialect.name == "postgresql"


async def lock_transaction(conn: AsyncConnection, key: int) -> None:
    """Wait for `key`, held until `conn`'s transaction ends."""
    await conn.execute(XACT_LOCK, {"key": key})


class Leadership:
    """One replica at a time holds `key`, on a connection kept for it alone."""

    def __init__(self, engine: AsyncEngine, key: int, what: str) -> None:
        self.engine = engine
        self.key = key
        self.what = what
        self._conn: AsyncConnection | None = None
        self.held = False

    async def acquire(self, poll: float, waiting: Callable[[], None] | None = None) -> None:
        """Return once this replica holds the lock, asking every `poll` seconds
        (`waiting` is called once another replica is found to hold it)."""
        while True:
            try:
                if await self.try_acquire():
                    log.info("this replica now runs %s", self.what)
                    return
                if waiting is not None:
                    waiting()
                    waiting = None
            except Exception as exc:  # the database is away: ask again later
                log.warning("cannot ask who runs %s: %s", self.what, exc)
                await self._drop()
            await asyncio.sleep(poll)

    async def try_acquire(self) -> bool:
        """One attempt: whether this replica now holds the lock."""
        conn = await self._connection()
        self.held = bool((await conn.execute(TRY_LOCK, {"key": self.key})).scalar())
        return self.held

    async def lost(self, every: float) -> None:
        """Return when the lock's connection no longer answers (checked every `every` s):
        its session, and so the lock, may be gone, so this replica must stop leading."""
        while True:
            await asyncio.sleep(every)
            try:
                assert self._conn is not None
                async with asyncio.timeout(every):
                    await self._conn.execute(PING)
            except Exception as exc:
                log.warning("this replica stops running %s: its lock is lost (%s)", self.what, exc)
                self.held = False
                await self._drop()
                return

    async def release(self) -> None:
        if self._conn is not None and self.held:
            try:
                async with asyncio.timeout(5):
                    await self._conn.execute(UNLOCK, {"key": self.key})
            except Exception:  # ending the session below frees it as well
                await self._drop()
        self.held = False
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None

    async def _connection(self) -> AsyncConnection:
        if self._conn is None:
            conn = await self.engine.connect()
            # Autocommit: the lock is the session's, no transaction may hang open with it.
            self._conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        return self._conn

    async def _drop(self) -> None:
        """Forget the connection without handing it back to the pool (its session ends)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.invalidate()
            with contextlib.suppress(Exception):
                await conn.close()
