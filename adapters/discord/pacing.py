"""Keeping within Discord's budget of messages written per channel.

Discord publishes no fixed limit for creating and editing messages; in practice
a channel takes about 5 writes per 5 seconds, and its `X-RateLimit-*` headers
say so. discord.py already waits when those headers say a bucket is empty and
retries a 429, but a wait there holds up the turn's renderer behind a stale edit.
So the adapter keeps the budget itself, before a call is made:

- every post or edit in a channel takes a slot; a slot is counted from when its
  call *finished*, which is never earlier than when Discord counted it;
- live edits (the answer still growing) leave `reserve` slots free, so that the
  calls a person is waiting for — the final text, a new part, a choice — find a
  slot at once instead of queueing behind an edit that will be replaced anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field


@dataclass
class _Channel:
    finished: deque[float] = field(default_factory=deque)
    in_flight: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class ChannelBudget:
    """At most `budget` writes per channel in any `window` seconds, kept by waiting."""

    def __init__(
        self,
        budget: int = 5,
        window: float = 5.0,
        *,
        reserve: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget = budget
        self.window = window
        # A budget of one slot cannot hold one back.
        self.reserve = min(reserve, budget - 1)
        self.clock = clock
        self.waited = 0.0
        self._channels: dict[int, _Channel] = {}

    @contextlib.asynccontextmanager
    async def slot(self, channel_id: int, *, live: bool) -> AsyncIterator[None]:
        """Held around one post or edit in `channel_id`."""
        channel = self._channel(channel_id)
        started = self.clock()
        while (wait := self._wait(channel, live)) > 0:
            channel.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(channel.changed.wait(), wait)
        self.waited += self.clock() - started
        channel.in_flight += 1
        try:
            yield
        finally:
            channel.in_flight -= 1
            channel.finished.append(self.clock())
            channel.changed.set()

    def _wait(self, channel: _Channel, live: bool) -> float:
        """0 when a slot is free now, else how long until one may be."""
        now = self.clock()
        while channel.finished and now - channel.finished[0] >= self.window:
            channel.finished.popleft()
        used = len(channel.finished) + channel.in_flight
        if used + (self.reserve if live else 0) < self.budget:
            return 0.0
        if channel.finished:
            return channel.finished[0] + self.window - now
        return self.window  # only calls in flight: one of them finishing wakes us

    def _channel(self, channel_id: int) -> _Channel:
        channel = self._channels.get(channel_id)
        if channel is None:
            self._forget_idle()
            channel = self._channels[channel_id] = _Channel()
        return channel

    def _forget_idle(self) -> None:
        now = self.clock()
        idle = [
            key for key, channel in self._channels.items()
            if not channel.in_flight
            and (not channel.finished or now - channel.finished[-1] >= self.window)
        ]
        for key in idle:
            del self._channels[key]
