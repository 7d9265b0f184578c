"""Events and their fan-out: one channel per active loop, any number of subscribers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from bridge.contract.events import TERMINAL

# A watcher further behind than this is cut off; it resumes with Last-Event-ID.
SUBSCRIBER_BACKLOG = 20_000
# Deltas that follow a release within this window are released together (see Channel).
BATCH_WINDOW = 0.025
# Every this many events, the channel drops what all its readers have passed.
TRIM_EVERY = 1024
STREAMING = frozenset({"assistant_delta", "thinking_delta"})


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a loop. `seq` is its resume id; `data` is what clients read."""

    name: str
    data: dict[str, Any]
    seq: int | None = None
    turn_id: str | None = None
    # `data` as JSON, encoded once: stored, and framed by the server for every stream.
    json: str = field(default="", compare=False)

    @classmethod
    def make(
        cls, name: str, data: dict[str, Any], seq: int | None = None, turn_id: str | None = None
    ) -> Event:
        return cls(name, data, seq, turn_id, json.dumps(data, separators=(",", ":")))

    @classmethod
    def from_row(cls, name: str, data: str, seq: int, turn_id: str | None) -> Event:
        return cls(name, json.loads(data), seq, turn_id, data)

    @property
    def terminal(self) -> bool:
        return self.name in TERMINAL


class Overflow(Exception):
    """The subscriber fell too far behind and was cut off."""


class Subscription:
    """One reader's position in a channel, and what it accepts of it."""

    def __init__(self, channel: Channel, accept: Callable[[Event], bool] | None) -> None:
        self._channel = channel
        self._accept = accept
        self.position = channel.end

    async def batches(self) -> AsyncIterator[list[Event]]:
        """What the channel has released since the last batch, as it is released."""
        while True:
            events = self._channel.released_since(self)
            if self._accept is not None:
                events = [event for event in events if self._accept(event)]
            if events:
                yield events
            else:
                await self._channel.next_release()

    def close(self) -> None:
        self._channel.unsubscribe(self)


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
    """A loop's recent events, kept once and read by every subscriber from its own position.

    Publishing appends the event once, whatever the number of readers. Readers see
    events when the channel releases them: at once, except a delta that follows a
    released delta within `BATCH_WINDOW`, which waits for the window to pass and goes
    out with the others; so a fast stream wakes every reader once per window (one
    write each) instead of once per delta, and its first delta is not held. Events
    every reader has passed are dropped; a reader more than `SUBSCRIBER_BACKLOG`
    behind is cut off.
    """

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._base = 0  # the position of _events[0]
        self._released = 0  # readers may read up to here
        self._subscribers: list[Subscription] = []
        self._release = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._last_release = -BATCH_WINDOW
        self._streaming = False  # the last release ended with a delta
        self._trim_at = TRIM_EVERY

    @property
    def end(self) -> int:
        return self._base + len(self._events)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def subscribe(self, accept: Callable[[Event], bool] | None = None) -> Subscription:
        sub = Subscription(self, accept)
        self._subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subscribers:
            self._subscribers.remove(sub)

    def publish(self, event: Event) -> None:
        if not self._subscribers:  # nobody to keep it for
            self._base = self._released = self.end + 1
            self._events.clear()
            return
        self._events.append(event)
        loop = asyncio.get_running_loop()
        due = self._last_release + BATCH_WINDOW
        if event.name not in STREAMING or not self._streaming or due <= loop.time():
            self._release_now()
        elif self._timer is None:
            self._timer = loop.call_at(due, self._release_now)
        if len(self._events) >= self._trim_at:
            self._trim()

    def released_since(self, sub: Subscription) -> list[Event]:
        if sub.position < self._base:
            raise Overflow
        if sub.position >= self._released:
            return []
        events = self._events[sub.position - self._base : self._released - self._base]
        sub.position = self._released
        return events

    async def next_release(self) -> None:
        await self._release.wait()

    def _release_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._released = self.end
        self._streaming = bool(self._events) and self._events[-1].name in STREAMING
        self._last_release = asyncio.get_running_loop().time()
        # set() wakes every reader waiting now; clear() makes the next wait a new one.
        self._release.set()
        self._release.clear()

    def _trim(self) -> None:
        oldest = min((sub.position for sub in self._subscribers), default=self.end)
        keep_from = max(self._base, oldest, self.end - SUBSCRIBER_BACKLOG)
        del self._events[: keep_from - self._base]
        self._base = keep_from
        self._trim_at = len(self._events) + TRIM_EVERY
