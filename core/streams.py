"""Streams of events: a new turn's, an earlier turn's replayed from the log, a loop's watched."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from sqlalchemy import select

from core.active_loops import ActiveLoops
from core.errors import EngineError
from core.events import Event, EventStream, Overflow, Subscription
from core.runtime import LoopRuntime
from core.storage import Database, EventLogUnavailable, EventWriter
from core.tables import events

REPLAY_BATCH = 500


@dataclass
class TurnStream:
    """The events of one turn, live or replayed."""

    turn_id: str
    events: EventStream


class Streams:
    def __init__(self, db: Database, writer: EventWriter, active: ActiveLoops) -> None:
        self.db = db
        self.writer = writer
        self.active = active

    async def caught_up(self) -> None:
        """Wait until the event log holds every event published so far; `not_ready` (503)
        when it cannot, rather than a reader that waits forever."""
        try:
            await self.writer.flush()
        except EventLogUnavailable as exc:
            raise EngineError("not_ready", f"{exc}; try again later (see /readyz)") from None

    def new_turn(
        self, runtime: LoopRuntime, subscription: Subscription, turn_id: str
    ) -> TurnStream:
        """A turn just queued: its events as they come, through its terminal one."""
        return TurnStream(turn_id, EventStream(self._until_terminal(runtime, subscription)))

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
            self.active.forget(runtime)

    async def replay_turn(self, loop: str, turn_id: str) -> TurnStream:
        """A turn an earlier request ran: its logged events, then the rest live."""
        runtime = self.active.get(loop)
        live = runtime.channel.subscribe(lambda e: e.turn_id == turn_id) if runtime else None
        try:
            await self.caught_up()
        except EngineError:
            if live is not None:
                live.close()
            raise
        return TurnStream(turn_id, EventStream(self._replay(loop, turn_id, live)))

    async def _replay(
        self, loop: str, turn_id: str, live: Subscription | None
    ) -> AsyncIterator[list[Event]]:
        last = 0
        try:
            async for batch in self.logged(loop, after=0, turn_id=turn_id):
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

    async def logged(
        self, loop: str, after: int, turn_id: str | None = None
    ) -> AsyncIterator[list[Event]]:
        """The loop's logged events after id `after` (of one turn, when given), in batches."""
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

    async def watch(self, runtime: LoopRuntime, last_event_id: int | None) -> EventStream:
        """Every event of the loop from now on (or after `last_event_id`), until closed."""
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
                await self.caught_up()
            except EngineError:
                subscription.close()
                self.active.forget(runtime)
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
                async for batch in self.logged(runtime.id, after=last_event_id):
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
            self.active.forget(runtime)


def _through_terminal(batch: list[Event]) -> list[Event]:
    """The batch up to and including its first terminal event."""
    for index, event in enumerate(batch):
        if event.terminal:
            return batch[: index + 1]
    return batch
