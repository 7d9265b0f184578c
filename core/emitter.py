"""A loop's events: typed models in, published with ids reserved in the database first.

Event ids are reserved `RESERVE_IDS` at a time, before any of them is published (more
are asked for at half-way): after a crash, numbering resumes above the reservation,
so no id a watcher has seen is ever handed out again. Each event's model is turned
into its data once, when emitted; the event log and every watcher share the result.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from sqlalchemy import Update, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.contract.events import EVENT_DATA, EventData
from core.events import Channel, Event
from core.storage import TRANSIENT, Database, EventWriter
from core.tables import loops

log = logging.getLogger(__name__)

RESERVE_IDS = 1000
EVENT_NAMES: dict[type[EventData], str] = {model: name for name, model in EVENT_DATA.items()}
Later = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[Any]"]
# An event waiting for its id: (name, data, turn id).
Held = tuple[str, dict[str, Any], str | None]


def event_name(event: EventData) -> str:
    return EVENT_NAMES[type(event)]


def make_event(event: EventData, seq: int | None = None, turn_id: str | None = None) -> Event:
    """The engine's event of a typed model, its data converted once."""
    return Event.make(event_name(event), event.model_dump(), seq, turn_id)


class Emitter:
    """Numbers, logs and fans out one loop's events."""

    def __init__(
        self,
        loop_id: str,
        db: Database,
        writer: EventWriter,
        seq: int,
        reserved: int,
        later: Later,
    ) -> None:
        self.loop_id = loop_id
        self._db = db
        # [ext] Swapped for one that writes nothing when another replica takes the loop over.
        self.writer = writer
        self._later = later
        self.seq = seq  # the id of the newest published event
        self.reserved = reserved  # ids up to here are reserved in the database
        # Events waiting for ids to be reserved (only when the database lags far behind).
        self._held: list[Held] = []
        self._reserving: asyncio.Task[Any] | None = None
        self.channel = Channel()

    def emit(self, event: EventData, turn_id: str | None) -> int:
        """Publish an event (or hold it until its id is reserved); the id it gets."""
        name = EVENT_NAMES[type(event)]
        data = event.model_dump()
        event_id = self.seq + len(self._held) + 1
        if self._reserving is None and self.seq + len(self._held) >= self._reserve_at:
            self._reserving = self._later(self._reserve())
        if self._held or self.seq >= self.reserved:
            self._held.append((name, data, turn_id))  # published once ids are reserved
        else:
            self.publish(name, data, turn_id)
        return event_id

    def publish(self, name: str, data: dict[str, Any], turn_id: str | None) -> None:
        self.seq += 1
        event = Event.make(name, data, self.seq, turn_id)
        self.writer.append(self.loop_id, self.seq, turn_id, name, event.json)
        self.channel.publish(event)

    def held_deltas(self, turn_id: str) -> int:
        """How many of the turn's text deltas wait for their ids."""
        return sum(1 for name, _, t in self._held if name == "assistant_delta" and t == turn_id)

    @property
    def _reserve_at(self) -> int:
        return self.reserved - RESERVE_IDS // 2

    async def _reserve(self) -> None:
        """Raise the loop's reservation ahead of the ids in use, then publish what waited."""
        try:
            while self.seq + len(self._held) >= self._reserve_at:
                target = self.seq + len(self._held) + RESERVE_IDS
                mine = (loops.c.id == self.loop_id) & (loops.c.event_id_reserved < target)
                reserve = update(loops).where(mine).values(event_id_reserved=target)

                async def raise_to(conn: AsyncConnection, statement: Update = reserve) -> None:
                    await conn.execute(statement)

                try:
                    await self._db.write_retrying(raise_to, f"loop {self.loop_id}: reserving ids")
                except TRANSIENT:
                    continue  # nothing can be published before; `stop` ends the attempts
                self.reserved = target
                held, self._held = self._held, []
                for event in held:
                    self.publish(*event)
        finally:
            self._reserving = None

    def stop(self) -> None:
        if self._reserving is not None:
            self._reserving.cancel()

    async def release_ids(self) -> None:
        """Give back the reserved ids no event took, so a clean stop leaves no gap in the ids.
        Only while the reservation is still this runtime's (a newer runtime may hold more)."""
        if self._held or self.reserved == self.seq:
            return
        mine = (loops.c.id == self.loop_id) & (loops.c.event_id_reserved == self.reserved)
        try:
            async with self._db.write() as conn:
                await conn.execute(update(loops).where(mine).values(event_id_reserved=self.seq))
        except Exception as exc:  # the reservation stands: ids jump, none is reused
            log.warning("loop %s: unused event ids were not given back: %s", self.loop_id, exc)
            return
        self.reserved = self.seq
