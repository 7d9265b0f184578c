"""Engine events as Server-Sent Events."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse, ServerSentEvent

from core.events import Event

PING_SECONDS = 15


def _ping() -> ServerSentEvent:
    return ServerSentEvent(data="{}", event="ping")


async def _frames(events: AsyncIterator[Event]) -> AsyncIterator[ServerSentEvent]:
    # aclosing: a client that leaves closes the engine's stream, which unsubscribes it.
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        async for event in events:
            seq = None if event.seq is None else str(event.seq)
            yield ServerSentEvent(data=event.json, event=event.name, id=seq)


def event_stream(
    events: AsyncIterator[Event], headers: dict[str, str] | None = None
) -> EventSourceResponse:
    return EventSourceResponse(
        _frames(events),
        ping=PING_SECONDS,
        ping_message_factory=_ping,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no", **(headers or {})},
    )
