"""Showing the rest of a turn that no renderer of this process is showing.

When the bot restarts while a turn waits on a choice, the renderer that showed
the turn is gone, but its buttons still work (their `custom_id` says which loop
and choice). A click then attaches to the loop's live events *before* answering,
so nothing the agent does after the answer is missed, and shows the rest of the
turn below the choice: the reply is not lost to the restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncGenerator, Iterator

from adapters.render import TurnRenderer
from adapters.surface import Surface
from adapters.turn_events import apply_event
from bridge.client import LoopApiError, LoopClient
from bridge.contract.events import TERMINAL, LoopEvent

log = logging.getLogger(__name__)

# A running turn's watch stream opens with a snapshot at once; none means no turn runs.
SNAPSHOT_WAIT = 2.0


class Followers:
    """Knows which loops this process is showing, and follows the others on demand."""

    def __init__(self, client: LoopClient, platform: str) -> None:
        self.client = client
        self.platform = platform
        self._showing: Counter[str] = Counter()

    @contextlib.contextmanager
    def showing(self, loop_id: str) -> Iterator[None]:
        """Held while a renderer of this process shows a turn of `loop_id`."""
        self._showing[loop_id] += 1
        try:
            yield
        finally:
            self._showing[loop_id] -= 1
            if not self._showing[loop_id]:
                del self._showing[loop_id]

    def shown(self, loop_id: str) -> bool:
        return self._showing[loop_id] > 0

    async def attach(self, loop_id: str) -> Follow | None:
        """The loop's running turn, from now on; None when no turn runs."""
        events = self.client.watch(loop_id)
        try:
            first = await asyncio.wait_for(anext(events), SNAPSHOT_WAIT)
        except (TimeoutError, StopAsyncIteration, LoopApiError) as exc:
            log.debug("no running turn to follow in %s: %s", loop_id, exc)
            await events.aclose()
            return None
        if first.event != "snapshot":
            await events.aclose()
            return None
        return Follow(self, loop_id, events)


class Follow:
    """A running turn's events after its snapshot (whose text was shown before)."""

    def __init__(
        self, followers: Followers, loop_id: str, events: AsyncGenerator[LoopEvent, None]
    ) -> None:
        self.followers = followers
        self.loop_id = loop_id
        self.events = events

    async def show(self, surface: Surface) -> None:
        renderer = TurnRenderer(
            surface,
            self.loop_id,
            own_source_prefix=f"{self.followers.platform}:",
            platform=self.followers.platform,
        )
        with self.followers.showing(self.loop_id):
            async with contextlib.aclosing(self.events), renderer.running():
                async for event in self.events:
                    apply_event(renderer, self.loop_id, event)
                    if event.event in TERMINAL:
                        break

    async def close(self) -> None:
        await self.events.aclose()
