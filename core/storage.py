"""The database: the async engine, migrations at start, and the batched event writer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import event, insert, make_url
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from core.errors import SettingsError
from core.tables import events

MIGRATIONS = Path(__file__).parent / "migrations"
# Events published within this long go to disk in one insert; a flush() cuts it short.
WRITE_LINGER_SECONDS = 0.05
INSERT_EVENTS = insert(events)


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

    async def migrate(self) -> None:
        """Bring the schema to the newest migration."""
        if self.sqlite_file is not None:
            private_sqlite_files(self.sqlite_file)
        async with self.engine.begin() as conn:
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


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


class EventWriter:
    """Writes the event log in batches, behind live delivery.

    Watchers get an event the moment it is published; the row follows within a
    batch. `flush()` waits until everything published so far is on disk, which
    readers of the log call first so the log agrees with what watchers saw.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._pending: list[dict] = []
        self._wake = asyncio.Event()
        self._hurry = asyncio.Event()
        self._written = 0
        self._queued = 0
        self._progress = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-writer")

    def append(self, loop_id: str, seq: int, turn_id: str | None, name: str, data: str) -> None:
        self._pending.append(
            {"loop_id": loop_id, "seq": seq, "turn_id": turn_id, "name": name, "data": data}
        )
        self._queued += 1
        self._wake.set()

    async def flush(self) -> None:
        target = self._queued
        self._hurry.set()
        async with self._progress:
            await self._progress.wait_for(lambda: self._written >= target or self._task is None)

    async def close(self) -> None:
        if self._task is None:
            return
        await self.flush()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            # The linger turns a turn's stream of events into a few inserts.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WRITE_LINGER_SECONDS):
                    await self._hurry.wait()
            self._wake.clear()
            self._hurry.clear()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            await self._write(batch)
            async with self._progress:
                self._written += len(batch)
                self._progress.notify_all()

    async def _write(self, batch: list[dict]) -> None:
        for attempt in range(5):
            try:
                async with self.db.write() as conn:
                    await conn.execute(INSERT_EVENTS, batch)
                return
            except Exception as exc:
                self._failure = exc
                await asyncio.sleep(0.05 * 2**attempt)
        raise RuntimeError(f"event log write failed: {self._failure}")
