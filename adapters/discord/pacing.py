"""Keeping within Discord's budget of messages posted and edited per channel.

Discord publishes no fixed limit for creating or editing messages; in practice a
channel takes about 5 posts and 5 edits per 5 seconds (two rate-limit buckets),
and its `X-RateLimit-*` headers say so. discord.py obeys those headers, but in
its own way: the call that empties a bucket does not return until the bucket
refills (up to the whole window), and a 429 is slept on inside the call. Either
holds the turn's renderer behind one call. So the adapter keeps the budget
itself, before a call is made, and keeps one slot in hand so that discord.py
never sees an empty bucket:

- every post, and every edit, in a channel takes a slot of its kind; a slot is
  counted from when its call *finished*, never earlier than Discord counted it;
- live calls (the answer still growing) leave `reserve` slots free, so that the
  calls a person is waiting for — the final text, a sealed part, a choice — find
  a slot at once instead of queueing behind an edit that will be replaced anyway;
- a turn's first words may take the slot in hand: a follow-up sent just after a
  long answer (whose edits filled the budget) shows its first words at once.
  discord.py then holds the channel's next call until Discord's bucket refills,
  which the budget would have made it wait for anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["post", "edit"]


@dataclass
class _Channel:
    finished: deque[float] = field(default_factory=deque)
    in_flight: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class ChannelBudget:
    """Fewer than `budget` posts, and fewer than `budget` edits, per channel in any `window`
    seconds (`budget` is what Discord allows; one slot stays in hand for first words)."""

    def __init__(
        self,
        budget: int = 5,
        window: float = 5.0,
        *,
        reserve: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = max(1, budget)
        self.budget = max(1, budget - 1)
        self.window = window
        # A budget of one slot cannot hold one back.
        self.reserve = min(reserve, self.budget - 1)
        self.clock = clock
        self.waited = 0.0
        self._channels: dict[tuple[int, Kind], _Channel] = {}

    @contextlib.asynccontextmanager
    async def slot(
        self, channel_id: int, kind: Kind, *, live: bool, first_words: bool = False
    ) -> AsyncIterator[None]:
        """Held around one post or edit in `channel_id`; `first_words`: the call that shows
        a turn's first text (it may take the slot in hand)."""
        channel = self._channel((channel_id, kind))
        started = self.clock()
        while (wait := self._wait(channel, live, first_words)) > 0:
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

    def free(self, channel_id: int, kind: Kind) -> int:
        """Slots a live call could take now (the reserve held back)."""
        channel = self._channels.get((channel_id, kind))
        if channel is None:
            return self.budget - self.reserve
        self._expire(channel)
        return max(0, self.budget - self.reserve - len(channel.finished) - channel.in_flight)

    def _expire(self, channel: _Channel) -> None:
        now = self.clock()
        while channel.finished and now - channel.finished[0] >= self.window:
            channel.finished.popleft()

    def _wait(self, channel: _Channel, live: bool, first_words: bool) -> float:
        """0 when a slot is free now, else how long until one may be."""
        self._expire(channel)
        now = self.clock()
        used = len(channel.finished) + channel.in_flight
        if first_words:
            if used < self.limit:
                return 0.0
        elif used + (self.reserve if live else 0) < self.budget:
            return 0.0
        if channel.finished:
            return channel.finished[0] + self.window - now
        return self.window  # only calls in flight: one of them finishing wakes us

    def _channel(self, key: tuple[int, Kind]) -> _Channel:
        channel = self._channels.get(key)
        if channel is None:
            self._forget_idle()
            channel = self._channels[key] = _Channel()
        return channel

    def _forget_idle(self) -> None:
        now = self.clock()
        idle = [
            key
            for key, channel in self._channels.items()
            if not channel.in_flight
            and (not channel.finished or now - channel.finished[-1] >= self.window)
        ]
        for key in idle:
            del self._channels[key]
