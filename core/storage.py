"""The database: the async engine, migrations at start, and the batched event writer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import event, insert, make_url, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from core.advisory import MIGRATIONS_LOCK, clustered, lock_transaction
from core.errors import SettingsError
from core.tables import events
from core.tasks import spawn

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
# Events published within this long go to disk in one insert; a flush() cuts it short.
WRITE_LINGER_SECONDS = 0.05
INSERT_EVENTS = insert(events)
# Failures of the database rather than of the rows (locked, read-only, full, unreachable,
# a table missing): retried for as long as they last. Anything else is the rows' own fault.
TRANSIENT = (OperationalError, InterfaceError, OSError, TimeoutError)
RETRY_FIRST_SECONDS = 0.05
RETRY_MAX_SECONDS = 2.0
# Seconds to wait after the n-th failure in a row: doubling, capped.
BACKOFF = wait_exponential(multiplier=RETRY_FIRST_SECONDS, max=RETRY_MAX_SECONDS)
# A flush that the writer cannot satisfy fails after this long, or at the writer's next
# failed attempt (a flush asks for one at once), whichever comes first.
FLUSH_TIMEOUT_SECONDS = 10.0
PING_TIMEOUT_SECONDS = 3.0
# Other writes off the request path (a turn's start and end, id reservations) retry this
# often (~10 s in all) and then fail, logged: a shutdown must not wait for them forever.
WRITE_ATTEMPTS = 8

T = TypeVar("T")


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.engine: AsyncEngine = create_async_engine(url, json_serializer=_strict_json)
        except ModuleNotFoundError as exc:
            raise SettingsError(
                f"LOOPBRIDGE_DATABASE_URL needs the driver {exc.name!r}: "
                "pip install loopbridge[postgres]"
            ) from None
        except Exception as exc:
            raise SettingsError(f"LOOPBRIDGE_DATABASE_URL is not usable: {exc}") from None
        self.sqlite_file: Path | None = None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
            name = make_url(url).database
            if name and name != ":memory:" and not name.startswith("file:"):
                self.sqlite_file = Path(name)
        self._write_lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction. Writers take turns here rather than in SQLite's busy
        handler, which sleeps in steps of milliseconds while another writer holds the lock."""
        async with self._write_lock, self.engine.begin() as conn:
            yield conn

    async def write_retrying(self, work: Callable[[AsyncConnection], Awaitable[T]], what: str) -> T:
        """`work` in a write transaction, retried with backoff while the database fails."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TRANSIENT),
            stop=stop_after_attempt(WRITE_ATTEMPTS),
            wait=BACKOFF,
            before_sleep=partial(_log_retry, what),
            reraise=True,
        )
        return await retrying(self._write_once, work)

    async def _write_once(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        async with self.write() as conn:
            return await work(conn)

    async def ping(self) -> None:
        """Raise unless the database answers a query within a few seconds."""
        async with asyncio.timeout(PING_TIMEOUT_SECONDS), self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def migrate(self) -> None:
        """Bring the schema to the newest migration."""
        if self.sqlite_file is not None:
            private_sqlite_files(self.sqlite_file)
        async with self.engine.begin() as conn:
            if clustered(self.engine):
                # Replicas starting together migrate one at a time: the later ones wait
                # here, then find the schema already new.
                await lock_transaction(conn, MIGRATIONS_LOCK)
            await conn.run_sync(_upgrade)

    async def close(self) -> None:
        await self.engine.dispose()


def private_dir(path: Path) -> None:
    """Make the data directory, readable by the server's user alone (0700)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def private_sqlite_files(path: Path) -> None:
    """The database and its -wal and -shm files readable by the server's user alone (0600).

    Made empty with that mode before SQLite first opens it: SQLite gives its -wal and
    -shm files the database file's mode."""
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(FileNotFoundError):
            name.chmod(0o600)


def _strict_json(value: object) -> str:
    # NaN and Infinity are not JSON: stored, they would break every later read.
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


def _upgrade(conn: Connection) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, "head")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


class EventLogUnavailable(Exception):
    """The event log cannot be written now; the message says why."""


class EventWriter:
    """Writes the event log in batches, behind live delivery.

    Watchers get an event the moment it is published; the row follows within a
    batch. `flush()` waits until everything published so far is on disk, which
    readers of the log call first so the log agrees with what watchers saw.

    The writer never gives up silently: a failing database is retried with backoff
    (each failure logged) while `problem` says what is wrong and `flush()` raises;
    rows the database refuses (e.g. an id already taken) cost only their own loop's
    rows of that batch, logged, never the other loops' or the writer itself.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._pending: list[dict[str, Any]] = []
        self._wake = asyncio.Event()
        self._hurry = asyncio.Event()
        self._written = 0  # rows done with: on disk, or refused and logged
        self._queued = 0
        self._attempts = 0  # write attempts finished, failed or not
        self._changed = asyncio.Event()  # set (and replaced) at every attempt's end
        self._task: asyncio.Task[None] | None = None
        self._failure: str | None = None  # the last attempt's error, until one succeeds
        self.linger = WRITE_LINGER_SECONDS
        # [ext] Several replicas: run in each insert's transaction (PostgreSQL's NOTIFY, so
        # that readers on other replicas wake when the rows are there). None: nothing to do.
        self.on_insert: Callable[[AsyncConnection, list[str]], Awaitable[None]] | None = None

    def start(self) -> None:
        self._task = spawn(self._run(), "event-writer")

    @property
    def problem(self) -> str | None:
        """Why the event log cannot be written now, or None when it can."""
        if self._task is None:
            return "the event-log writer is not running"
        if self._task.done():
            return "the event-log writer has stopped"
        if self._failure is not None:
            return f"the event log cannot be written: {self._failure}"
        return None

    def append(self, loop_id: str, seq: int, turn_id: str | None, name: str, data: str) -> None:
        self._pending.append(
            {"loop_id": loop_id, "seq": seq, "turn_id": turn_id, "name": name, "data": data}
        )
        self._queued += 1
        self._wake.set()

    async def flush(self) -> None:
        """Wait until every event appended so far is written; `EventLogUnavailable` when
        the writer cannot make progress (its next attempt fails, or it takes too long)."""
        target = self._queued
        if self._written >= target:
            return
        attempts = self._attempts
        self._hurry.set()
        try:
            async with asyncio.timeout(FLUSH_TIMEOUT_SECONDS):
                while self._written < target:
                    problem = self.problem
                    if problem is not None and (self._attempts > attempts or self._failure is None):
                        raise EventLogUnavailable(problem)
                    await self._changed.wait()
        except TimeoutError:
            raise EventLogUnavailable(
                f"the event log is {target - self._written} events behind after "
                f"{FLUSH_TIMEOUT_SECONDS:.0f} s"
            ) from None

    async def close(self) -> None:
        if self._task is None:
            return
        try:
            await self.flush()
        except EventLogUnavailable as exc:
            log.error("%d events are not in the event log at shutdown: %s", self.behind, exc)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    @property
    def behind(self) -> int:
        return self._queued - self._written

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            # The linger turns a turn's stream of events into a few inserts.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.linger):
                    await self._hurry.wait()
            self._wake.clear()
            self._hurry.clear()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            size = len(batch)
            try:
                await self._write(batch)
            except Exception:  # a bug must not stop the writer: those rows are lost, said so
                log.exception("%d events could not be written to the event log", len(batch))
            self._written += size
            self._attempted()

    async def _write(self, batch: list[dict[str, Any]]) -> None:
        """Write `batch` (rows are removed from it as they are done with), retrying for as
        long as the database fails; a flush cuts a retry's wait short."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TRANSIENT),
            wait=BACKOFF,
            sleep=self._pause,
            before_sleep=self._failed,
            reraise=True,
        )
        await retrying(self._insert, batch)
        failures = retrying.statistics.get("attempt_number", 1) - 1
        if failures:
            log.warning("the event log is written again after %d failed attempts", failures)
        self._failure = None

    def _failed(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        self._failure = f"{type(exc).__name__}: {_first_line(exc)}" if exc else "unknown"
        delay = state.upcoming_sleep
        log.error(
            "event log write failed (attempt %d, %d events wait), retrying in %.2f s: %s",
            state.attempt_number, self.behind, delay, self._failure,
        )  # fmt: skip
        self._attempted()

    async def _pause(self, delay: float) -> None:
        """The wait before the next attempt, which a flush cuts short."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._hurry.wait()
        self._hurry.clear()

    async def _insert(self, batch: list[dict[str, Any]]) -> None:
        try:
            async with self.db.write() as conn:
                await conn.execute(INSERT_EVENTS, batch)
                if self.on_insert is not None:
                    await self.on_insert(conn, sorted({row["loop_id"] for row in batch}))
            batch.clear()
            return
        except TRANSIENT:
            raise
        except Exception as exc:
            log.warning("the event log refused a batch of %d events: %s", len(batch), exc)
        # Some rows were refused: each loop's rows in a transaction of their own, so one
        # loop's conflict does not cost the others their log.
        by_loop: dict[str, list[dict[str, Any]]] = {}
        for row in batch:
            by_loop.setdefault(row["loop_id"], []).append(row)
        for loop_id, rows in by_loop.items():
            try:
                async with self.db.write() as conn:
                    await conn.execute(INSERT_EVENTS, rows)
                    if self.on_insert is not None:
                        await self.on_insert(conn, [loop_id])
            except TRANSIENT:
                raise
            except Exception as exc:
                log.error(
                    "loop %s: %d events (ids %d–%d) are not in the event log, refused: %s",
                    loop_id, len(rows), rows[0]["seq"], rows[-1]["seq"], _first_line(exc),
                )  # fmt: skip
            batch[:] = [row for row in batch if row["loop_id"] != loop_id]

    def _attempted(self) -> None:
        self._attempts += 1
        self._changed.set()
        self._changed = asyncio.Event()


def _log_retry(what: str, state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    log.warning(
        "%s failed (attempt %d), retrying in %.2f s: %s",
        what, state.attempt_number, state.upcoming_sleep, _first_line(exc) if exc else "",
    )  # fmt: skip


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
