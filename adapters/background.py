"""Showing the turns no message started: a background command finishing wakes the agent.

While a conversation's loop is in use, its adapter follows the loop's events
(`GET /events`) and shows each `background` turn in that conversation, as it shows a
person's turn. Following starts before a person's message is sent, so a command that
finishes at once is not missed, and stops once the loop has been quiet for
`quiet_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from adapters.showing import TurnShows
from adapters.surface import Surface
from adapters.turn_events import starts_background_turn, turn_of
from bridge.client import LoopClient
from bridge.contract.events import LoopEvent

log = logging.getLogger(__name__)

QUIET_SECONDS = 1800.0


@dataclass
class _Follower:
    surface: Callable[[], Surface]
    task: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class BackgroundTurns:
    """One follower per loop in use; `close()` stops them all."""

    def __init__(
        self, client: LoopClient, shows: TurnShows, quiet_seconds: float = QUIET_SECONDS
    ) -> None:
        self.client = client
        self.shows = shows
        self.quiet_seconds = quiet_seconds
        self._followers: dict[str, _Follower] = {}

    def follow(self, loop_id: str, surface: Callable[[], Surface]) -> None:
        """Show `loop_id`'s background turns on `surface()` from now on, until it is quiet."""
        follower = self._followers.get(loop_id)
        if follower is None:
            follower = self._followers[loop_id] = _Follower(surface)
            follower.task = asyncio.create_task(self._run(loop_id, follower))
            follower.task.add_done_callback(lambda _: self._forget(loop_id, follower))
        follower.surface = surface
        self._keep(follower)

    async def close(self) -> None:
        tasks = [f.task for f in self._followers.values() if f.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _keep(self, follower: _Follower) -> None:
        """The loop was active: follow it for another `quiet_seconds`."""
        if follower.timer is not None:
            follower.timer.cancel()
        assert follower.task is not None
        loop = asyncio.get_running_loop()
        follower.timer = loop.call_later(self.quiet_seconds, follower.task.cancel)

    def _forget(self, loop_id: str, follower: _Follower) -> None:
        if follower.timer is not None:
            follower.timer.cancel()
        if self._followers.get(loop_id) is follower:
            del self._followers[loop_id]

    async def _run(self, loop_id: str, follower: _Follower) -> None:
        try:
            async with contextlib.aclosing(self.client.watch(loop_id)) as events:
                async for event in events:
                    self._keep(follower)
                    if starts_background_turn(event):
                        await self._show(loop_id, event, events, follower)
        except Exception as exc:  # the loop was archived, the server went away for good
            log.info("stopped following loop %s: %s", loop_id, exc)

    async def _show(
        self,
        loop_id: str,
        started: LoopEvent,
        events: AsyncGenerator[LoopEvent, None],
        follower: _Follower,
    ) -> None:
        turn_id = turn_of(started)

        async def this_turn() -> AsyncGenerator[LoopEvent, None]:
            yield started
            async for event in events:
                self._keep(follower)
                if turn_of(event) not in (None, turn_id):
                    continue  # a message queued behind this turn: its sender shows it
                yield event

        # Closing this turn's events leaves the loop's watch stream open for the next.
        async with contextlib.aclosing(this_turn()) as turn:
            await self.shows.show(self.shows.renderer(follower.surface(), loop_id), turn)
