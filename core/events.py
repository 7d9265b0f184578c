"""Events and their fan-out: one channel per active loop, any number of subscribers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

TERMINAL = frozenset({"done", "interrupted", "error"})

# A watcher further behind than this is cut off; it resumes with Last-Event-ID.
SUBSCRIBER_BACKLOG = 20_000
# Deltas that follow a batch within this window are sent together (see Subscription).
BATCH_WINDOW = 0.025
STREAMING = frozenset({"assistant_delta", "thinking_delta"})


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a loop. `seq` is its resume id; `data` is what clients read."""

    name: str
    data: dict[str, Any]
    seq: int | None = None
    turn_id: str | None = None
    json: str = field(default="", compare=False)
    # The SSE frame, encoded once and shared by every stream that carries the event.
    frame: bytes = field(default=b"", compare=False)

    @classmethod
    def make(
        cls, name: str, data: dict[str, Any], seq: int | None = None, turn_id: str | None = None
    ) -> Event:
        return cls.build(name, data, json.dumps(data, separators=(",", ":")), seq, turn_id)

    @classmethod
    def from_row(cls, name: str, data: str, seq: int, turn_id: str | None) -> Event:
        return cls.build(name, json.loads(data), data, seq, turn_id)

    @classmethod
    def build(
        cls, name: str, data: dict[str, Any], text: str, seq: int | None, turn_id: str | None
    ) -> Event:
        head = f"id: {seq}\r\n" if seq is not None else ""
        frame = f"{head}event: {name}\r\ndata: {text}\r\n\r\n".encode()
        return cls(name, data, seq, turn_id, text, frame)

    @property
    def terminal(self) -> bool:
        return self.name in TERMINAL


class Overflow(Exception):
    """The subscriber fell too far behind and was cut off."""


class Subscription:
    """One reader's queue of a channel's events, read in batches.

    Streaming text is coalesced: after a batch, deltas that follow within
    `BATCH_WINDOW` wait for the window to pass and go out together, so a fast
    stream costs each reader one write per window instead of one per delta. Any
    other event (a tool call, a choice, the end of the turn) ends the wait at once.
    """

    def __init__(self, channel: Channel, accept: Callable[[Event], bool]) -> None:
        self._channel = channel
        self._accept = accept
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self._lingering: asyncio.Future[None] | None = None
        self.overflowed = False

    def offer(self, event: Event) -> None:
        if not self._accept(event):
            return
        if self._queue.qsize() >= SUBSCRIBER_BACKLOG:
            self.overflowed = True
            self._queue.put_nowait(None)
            self._channel.unsubscribe(self)
            return
        self._queue.put_nowait(event)
        if event.name not in STREAMING:
            self._stop_lingering()

    async def get(self) -> Event:
        event = await self._queue.get()
        if event is None:
            raise Overflow
        return event

    def close(self) -> None:
        self._channel.unsubscribe(self)

    async def batches(self) -> AsyncIterator[list[Event]]:
        loop = asyncio.get_running_loop()
        last_batch = -BATCH_WINDOW
        while True:
            first = await self.get()
            wait = last_batch + BATCH_WINDOW - loop.time()
            if wait > 0 and first.name in STREAMING:
                await self._linger(loop, wait)
            batch = [first]
            while not self._queue.empty():
                event = self._queue.get_nowait()
                if event is None:
                    raise Overflow
                batch.append(event)
            last_batch = loop.time()
            yield batch

    async def _linger(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        self._lingering = loop.create_future()
        timer = loop.call_later(seconds, self._stop_lingering)
        try:
            await self._lingering
        finally:
            timer.cancel()
            self._lingering = None

    def _stop_lingering(self) -> None:
        if self._lingering is not None and not self._lingering.done():
            self._lingering.set_result(None)


class EventStream:
    """A stream of events, read one by one or in batches (what is already waiting)."""

    def __init__(self, batches: AsyncIterator[list[Event]]) -> None:
        self._batches = batches

    def batches(self) -> AsyncIterator[list[Event]]:
        return self._batches

    async def __aiter__(self) -> AsyncIterator[Event]:
        async for batch in self._batches:
            for event in batch:
                yield event

    async def aclose(self) -> None:
        await self._batches.aclose()  # type: ignore[attr-defined]


class Channel:
    """Delivers each published event to every subscriber, synchronously and in order."""

    def __init__(self) -> None:
        self._subscribers: list[Subscription] = []

    def subscribe(self, accept: Callable[[Event], bool] = lambda _e: True) -> Subscription:
        sub = Subscription(self, accept)
        self._subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subscribers:
            self._subscribers.remove(sub)

    def publish(self, event: Event) -> None:
        for sub in list(self._subscribers):
            sub.offer(event)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)
