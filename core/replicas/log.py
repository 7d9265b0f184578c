"""[ext] Following a loop's event log from a replica that does not run the loop.

The event log is the source of truth: the owner writes each loop's events in order, and
every insert's transaction sends a PostgreSQL `NOTIFY` naming the loop. Readers here wait
on one `LISTEN` connection per replica and read the rows after the last id they passed,
in order, so ids, order and gaps are the owner's; a poll now and then covers a
notification lost while the listening connection was down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import func, make_url, select, text
from sqlalchemy.ext.asyncio import AsyncConnection
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from core.events import Channel, Event, Overflow
from core.storage import BACKOFF, Database
from core.tables import events
from core.tasks import spawn

log = logging.getLogger(__name__)

CHANNEL = "loopbridge_events"
NOTIFY = text("SELECT pg_notify(:channel, l) FROM unnest(CAST(:loops AS text[])) AS l")
# A reader re-reads the log at least this often, notified or not.
POLL_SECONDS = 1.0
READ_BATCH = 500
SNAPSHOT_EVENTS = ("started", "assistant_delta", "requires_choice", "choice_resolved")


async def notify(conn: AsyncConnection, loop_ids: list[str]) -> None:
    """Wake the readers of these loops on every replica once this transaction commits."""
    await conn.execute(NOTIFY, {"channel": CHANNEL, "loops": loop_ids})


class LogFollower:
    """This replica's `LISTEN` connection and the readers it wakes."""

    def __init__(self, db: Database) -> None:
        self.db = db
        url = make_url(db.url).set(drivername="postgresql")
        self._dsn = url.render_as_string(hide_password=False)
        self._wakes: dict[str, asyncio.Event] = {}
        self._tails: dict[str, _Tail] = {}
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()

    async def start(self) -> None:
        self._task = spawn(self._listen(), "replicas: listen")
        with contextlib.suppress(TimeoutError):  # readers poll meanwhile
            async with asyncio.timeout(5):
                await self.listening.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _listen(self) -> None:
        import asyncpg  # the postgres extra's driver, present whenever replicas run

        connecting = AsyncRetrying(
            retry=retry_if_exception_type((OSError, asyncpg.PostgresError)),
            wait=BACKOFF,
            before_sleep=_cannot_listen,
        )
        while True:
            lost = asyncio.Event()
            conn: Any = await connecting(asyncpg.connect, self._dsn)
            try:
                conn.add_termination_listener(lambda _conn, ended=lost: ended.set())
                await conn.add_listener(CHANNEL, self._notified)
                self.listening.set()
                await lost.wait()
                log.warning("replicas: the listening connection ended; listening again")
            finally:
                self.listening.clear()
                self._wake_all()  # what was missed meanwhile is read now
                with contextlib.suppress(Exception):
                    await conn.close(timeout=2)

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        wake = self._wakes.pop(payload, None)
        if wake is not None:
            wake.set()

    def _wake_all(self) -> None:
        wakes, self._wakes = self._wakes, {}
        for wake in wakes.values():
            wake.set()

    async def read(self, loop: str, after: int) -> list[Event]:
        query = (
            select(events)
            .where(events.c.loop_id == loop, events.c.seq > after)
            .order_by(events.c.seq)
            .limit(READ_BATCH)
        )
        async with self.db.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [Event.from_row(r.name, r.data, r.seq, r.turn_id) for r in rows]

    async def stream(self, loop: str, after: int, start: list[Event]) -> AsyncIterator[list[Event]]:
        """The loop's events after `after` as the log gets them, until the reader leaves.

        The readers of one loop here share one tail of its log (one query per write,
        whatever their number); each catches up from the log on its own first."""
        tail = self._tails.get(loop)
        if tail is None:
            tail = self._tails[loop] = _Tail(self, loop, after)
        subscription = tail.channel.subscribe()
        joined = tail.after  # the channel carries every event after this one
        last = after
        try:
            if start:
                yield start
            while last < joined:
                batch = await self.read(loop, last)
                if not batch:
                    break
                last = batch[-1].seq or last
                yield batch
            async for batch in subscription.batches():
                if (batch[0].seq or 0) <= last:
                    batch = [e for e in batch if (e.seq or 0) > last]
                if batch:
                    last = batch[-1].seq or last
                    yield batch
        except Overflow:  # too far behind: the client resumes with Last-Event-ID
            return
        finally:
            subscription.close()

    async def turn(self, loop: str, after: int, turn_id: str) -> AsyncIterator[list[Event]]:
        """One turn's events after `after`, through its terminal event."""
        while True:
            # Taken before the read: a notification that comes during it is not missed.
            wake = self._wakes.setdefault(loop, asyncio.Event())
            batch = await self.read(loop, after)
            if batch:
                after = batch[-1].seq or after
                mine = _through_terminal([e for e in batch if e.turn_id == turn_id])
                if mine:
                    yield mine
                    if mine[-1].terminal:
                        return
                continue
            await _wait(wake)


class _Tail:
    """One reader of a loop's log on this replica, publishing what it reads to the loop's
    readers here; it ends when none is left."""

    def __init__(self, follower: LogFollower, loop: str, after: int) -> None:
        self.follower = follower
        self.loop = loop
        self.after = after  # the newest event published
        self.channel = Channel()
        self.task = spawn(self._run(), f"replicas: tail of {loop}")

    async def _run(self) -> None:
        follower, loop = self.follower, self.loop
        try:
            while True:
                wake = follower._wakes.setdefault(loop, asyncio.Event())
                try:
                    batch = await follower.read(loop, self.after)
                except Exception as exc:  # the database: tried again at the next wake
                    log.warning("replicas: reading loop %s's log failed: %s", loop, exc)
                    batch = []
                for event in batch:
                    self.after = event.seq or self.after
                    self.channel.publish(event)
                if batch:
                    continue
                if self.channel.subscriber_count == 0:
                    return
                await _wait(wake)
        finally:
            if follower._tails.get(loop) is self:
                del follower._tails[loop]


async def _wait(wake: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(POLL_SECONDS):
            await wake.wait()


async def snapshot(conn: AsyncConnection, loop: str) -> tuple[int, Event | None]:
    """The log's newest id, and a `snapshot` of the turn running as of it (from the log: the
    text so far and the pending choice), if one is."""
    newest = await conn.scalar(
        select(func.coalesce(func.max(events.c.seq), 0)).where(events.c.loop_id == loop)
    )
    started = (
        await conn.execute(
            select(events.c.turn_id, events.c.seq)
            .where(events.c.loop_id == loop, events.c.name == "started")
            .order_by(events.c.seq.desc())
            .limit(1)
        )
    ).first()
    if started is None:
        return newest or 0, None
    rows = (
        await conn.execute(
            select(events.c.name, events.c.data)
            .where(events.c.loop_id == loop, events.c.turn_id == started.turn_id)
            .where(events.c.seq >= started.seq, events.c.seq <= newest)
            .order_by(events.c.seq)
        )
    ).all()
    text_so_far: list[str] = []
    pending: list[str] = []
    for name, raw in rows:
        if name in ("done", "interrupted", "error"):
            return newest or 0, None
        if name not in SNAPSHOT_EVENTS or name == "started":
            continue
        data = json.loads(raw)
        if name == "assistant_delta":
            text_so_far.append(data["text"])
        elif name == "requires_choice":
            pending.append(data["choice_id"])
        elif data["choice_id"] in pending:
            pending.remove(data["choice_id"])
    data = {
        "turn_id": started.turn_id,
        "assistant_text_so_far": "".join(text_so_far),
        "pending_choice_id": pending[0] if pending else None,
    }
    return newest or 0, Event.make("snapshot", data, newest, started.turn_id)


def _cannot_listen(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    log.warning("replicas: cannot listen for new events: %s", exc)


def _through_terminal(batch: list[Event]) -> list[Event]:
    for index, event in enumerate(batch):
        if event.terminal:
            return batch[: index + 1]
    return batch
