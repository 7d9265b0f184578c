"""Engine events as Server-Sent Events: the framing, and the response that streams it.

The response is a small Starlette streaming response of our own rather than
sse-starlette's: that one wraps every send in a cancel scope (its per-send timeout, even
with no timeout set), which with hundreds of watchers was a tenth of the server's
fan-out time, and it offers no public way around it. What it did beyond streaming is
kept here: a `ping` every 15 s, the end of the stream when the client leaves, and when
the server shuts down (see `DRAIN`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Coroutine, Mapping
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from core.events import Event, EventStream

PING_SECONDS = 15.0
PING = b"event: ping\r\ndata: {}\r\n\r\n"
# The ASGI scope extension through which the connection (bridge/server/protocol.py) says
# that the server is shutting down: `{"event": an asyncio.Event}`, set then.
DRAIN = "loopbridge.drain"
# How many recent events keep their encoded frame (a fan-out reads each within a batch).
CACHED_FRAMES = 4096


def encode(event: Event) -> bytes:
    head = f"id: {event.seq}\r\n" if event.seq is not None else ""
    return f"{head}event: {event.name}\r\ndata: {event.json}\r\n\r\n".encode()


class FrameCache:
    """Each event's SSE frame, encoded once and shared by every stream that carries it.

    Keyed by the event's identity: an entry holds its event, so no other event can take
    its id while it is cached. Two generations bound the size: when the newer fills up,
    the older is dropped (a stream far behind encodes its frames again, nothing worse).
    """

    def __init__(self, size: int = CACHED_FRAMES) -> None:
        self._size = size
        self._new: dict[int, tuple[Event, bytes]] = {}
        self._old: dict[int, tuple[Event, bytes]] = {}

    def frame(self, event: Event) -> bytes:
        key = id(event)
        hit = self._new.get(key) or self._old.get(key)
        if hit is not None and hit[0] is event:
            return hit[1]
        frame = encode(event)
        if len(self._new) >= self._size:
            self._old, self._new = self._new, {}
        self._new[key] = (event, frame)
        return frame


FRAMES = FrameCache()


async def _frames(stream: EventStream) -> AsyncGenerator[bytes, None]:
    # What is already waiting goes out in one write, so a busy loop costs one send per
    # batch, not per event. aclosing: a client that leaves closes the engine's stream,
    # which unsubscribes it.
    frame = FRAMES.frame
    async with contextlib.aclosing(stream):
        async for batch in stream.batches():
            yield b"".join([frame(event) for event in batch])


class EventStreamResponse(StreamingResponse):
    """`text/event-stream`: the frames as they come, a ping when the stream is quiet for
    PING_SECONDS, until the frames end, the client leaves or the server drains."""

    media_type = "text/event-stream"

    def __init__(self, frames: AsyncGenerator[bytes, None], headers: Mapping[str, str]) -> None:
        super().__init__(frames, headers=headers)
        self._frames = frames
        self._lock = asyncio.Lock()  # a ping never lands inside a batch
        self._client_left = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": self.status_code}
        await send({**start, "headers": self.raw_headers})
        if scope["method"] == "HEAD":  # headers only: a stream would never end
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        drain = scope.get("extensions", {}).get(DRAIN, {}).get("event")
        parts: list[Coroutine[Any, Any, object]] = [
            self._stream(send),
            self._ping(send),
            self._until_gone(receive),
        ]
        if isinstance(drain, asyncio.Event):
            parts.append(drain.wait())
        # The first part to end ends the others.
        tasks = [asyncio.ensure_future(part) for part in parts]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._frames.aclose()
        for task in done:
            task.result()  # a failure of the stream is raised as itself
        if not self._client_left:
            with contextlib.suppress(OSError):  # the peer may be gone already
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stream(self, send: Send) -> None:
        async for chunk in self._frames:
            async with self._lock:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def _ping(self, send: Send) -> None:
        while True:
            await asyncio.sleep(PING_SECONDS)
            async with self._lock:
                await send({"type": "http.response.body", "body": PING, "more_body": True})

    async def _until_gone(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._client_left = True


def event_stream(stream: EventStream, headers: dict[str, str] | None = None) -> EventStreamResponse:
    return EventStreamResponse(
        _frames(stream),
        headers={
            "Cache-Control": "no-store",
            "Connection": "keep-alive",
            "X-Accel-Buffering": "no",
            **(headers or {}),
        },
    )
