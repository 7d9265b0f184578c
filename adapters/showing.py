"""Showing a turn until it ends: the one way every turn is shown, and the follower.

Whatever started a turn — a person's message, a command that finished in the
background, a click after a restart — its events are applied to a `TurnRenderer`
here, until the turn's terminal event. `TurnShows` also knows which loops this
process is showing, so a click knows whether the rest of its turn is shown already.

The follower: when the adapter restarts while a turn waits on a choice, the renderer
that showed the turn is gone, but its buttons still work (they say which loop and
choice). A click then attaches to the loop's live events *before* answering, so
nothing the agent does after the answer is missed, and shows the rest of the turn
below the choice: the reply is not lost to the restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Iterator

from adapters.render import TurnRenderer
from adapters.surface import Surface
from adapters.turn_events import apply_event, ends_turn, is_snapshot
from bridge.client import LoopApiError, LoopClient
from bridge.contract.events import LoopEvent

log = logging.getLogger(__name__)

# A running turn's watch stream opens with a snapshot at once; none means no turn runs.
SNAPSHOT_WAIT = 2.0


class TurnShows:
    """One per adapter process."""

    def __init__(self, client: LoopClient, platform: str) -> None:
        self.client = client
        self.platform = platform
        self._showing: Counter[str] = Counter()

    def renderer(self, surface: Surface, loop_id: str, link: str = "") -> TurnRenderer:
        return TurnRenderer(
            surface,
            loop_id,
            own_source_prefix=f"{self.platform}:",
            platform=self.platform,
            link=link,
        )

    async def show(self, renderer: TurnRenderer, events: AsyncIterator[LoopEvent]) -> None:
        """Every event of `events` applied to `renderer` until the turn ends; the renderer's
        messages are final when this returns (see `TurnRenderer.running`)."""
        with self._shown_here(renderer.loop_id):
            async with renderer.running():
                async for event in events:
                    apply_event(renderer, renderer.loop_id, event)
                    if ends_turn(event):
                        return

    def shown(self, loop_id: str) -> bool:
        """A turn of `loop_id` is being shown by this process."""
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
        if not is_snapshot(first):
            await events.aclose()
            return None
        return Follow(self, loop_id, events)

    @contextlib.contextmanager
    def _shown_here(self, loop_id: str) -> Iterator[None]:
        self._showing[loop_id] += 1
        try:
            yield
        finally:
            self._showing[loop_id] -= 1
            if not self._showing[loop_id]:
                del self._showing[loop_id]


class Follow:
    """A running turn's events after its snapshot (whose text was shown before)."""

    def __init__(
        self, shows: TurnShows, loop_id: str, events: AsyncGenerator[LoopEvent, None]
    ) -> None:
        self.shows = shows
        self.loop_id = loop_id
        self.events = events

    async def show(self, surface: Surface) -> None:
        async with contextlib.aclosing(self.events):
            await self.shows.show(self.shows.renderer(surface, self.loop_id), self.events)

    async def close(self) -> None:
        await self.events.aclose()
