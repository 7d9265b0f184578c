"""Engine events as Server-Sent Events."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Message, Send

from core.events import EventStream

PING_SECONDS = 15


def _ping() -> ServerSentEvent:
    return ServerSentEvent(data="{}", event="ping")


async def _frames(stream: EventStream) -> AsyncIterator[bytes]:
    # Each event's frame is encoded once and shared by all streams; what is already
    # waiting goes out in one write, so a busy loop costs one send per batch, not per event.
    # aclosing: a client that leaves closes the engine's stream, which unsubscribes it.
    async with contextlib.aclosing(stream):
        async for batch in stream.batches():
            yield b"".join(event.frame for event in batch)


class _EventSourceResponse(EventSourceResponse):
    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        # With no send timeout, skip the cancel scope sse-starlette opens around every
        # send: with hundreds of watchers it was a tenth of the server's fan-out time.
        if self.send_timeout is None:
            await send(message)
        else:
            await super()._send_with_timeout(send, message)


def event_stream(stream: EventStream, headers: dict[str, str] | None = None) -> EventSourceResponse:
    return _EventSourceResponse(
        _frames(stream),
        ping=PING_SECONDS,
        ping_message_factory=_ping,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no", **(headers or {})},
    )
