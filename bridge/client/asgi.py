"""An httpx transport that calls an ASGI app in-process and streams its response.

httpx's own `ASGITransport` waits for the whole body, so a Server-Sent Events
stream would arrive only when it ends. This one runs the app in a task and hands
each body chunk to the reader as the app sends it. It does not run the app's
lifespan: whoever owns the app starts and stops it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import httpx

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

# How long an app may take to finish after its client left, before it is cancelled.
DISCONNECT_GRACE = 5.0

log = logging.getLogger(__name__)


class _Exchange:
    """One request in flight: feeds the app the request body and collects its response."""

    def __init__(self, request: httpx.Request) -> None:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        self._body = aiter(request.stream)
        self._body_sent = False
        self.answered = asyncio.Event()  # the response started, or the app ended without one
        self.left = asyncio.Event()  # the client closed the response, or it is complete
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.chunks: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def receive(self) -> Message:
        if not self._body_sent and not self.left.is_set():
            try:
                chunk = await anext(self._body)
            except StopAsyncIteration:
                self._body_sent = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return {"type": "http.request", "body": chunk, "more_body": True}
        await self.left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = list(message.get("headers", []))
            self.answered.set()
        elif message["type"] == "http.response.body" and not self.left.is_set():
            if body := message.get("body", b""):
                self.chunks.put_nowait(body)
            if not message.get("more_body", False):
                self.complete = True
                self.left.set()
                self.chunks.put_nowait(None)

    def app_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("the ASGI app failed", exc_info=exc)
        self.answered.set()
        self.chunks.put_nowait(None)


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, exchange: _Exchange, task: asyncio.Task[None]) -> None:
        self._exchange = exchange
        self._task = task

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (chunk := await self._exchange.chunks.get()) is not None:
            yield chunk
        if not self._exchange.complete:
            raise httpx.RemoteProtocolError(
                "the app ended without finishing its response"
            ) from _failure(self._task)

    async def aclose(self) -> None:
        await _disconnect(self._exchange, self._task)


class StreamingASGITransport(httpx.AsyncBaseTransport):
    """Sends requests to an ASGI app in this event loop; response bodies stream."""

    def __init__(self, app: ASGIApp, client: tuple[str, int] = ("127.0.0.1", 123)) -> None:
        self.app = app
        self.client = client

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        exchange = _Exchange(request)
        task = asyncio.create_task(self._call(self._scope(request), exchange))
        task.add_done_callback(exchange.app_ended)
        try:
            await exchange.answered.wait()
        except BaseException:
            await _disconnect(exchange, task)
            raise
        if exchange.status is None:
            raise httpx.RemoteProtocolError("the app ended without answering") from _failure(task)
        return httpx.Response(
            exchange.status, headers=exchange.headers, stream=_ResponseStream(exchange, task)
        )

    async def _call(self, scope: dict[str, Any], exchange: _Exchange) -> None:
        await self.app(scope, exchange.receive, exchange.send)

    def _scope(self, request: httpx.Request) -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "headers": [(key.lower(), value) for key, value in request.headers.raw],
            "scheme": request.url.scheme,
            "path": request.url.path,
            "raw_path": request.url.raw_path.split(b"?")[0],
            "query_string": request.url.query,
            "root_path": "",
            "server": (request.url.host, request.url.port),
            "client": self.client,
        }


async def _disconnect(exchange: _Exchange, task: asyncio.Task[None]) -> None:
    """Tell the app its client left, then give it a moment to wind down."""
    exchange.left.set()
    await asyncio.wait({task}, timeout=DISCONNECT_GRACE)
    if not task.done():
        task.cancel()
        await asyncio.wait({task})


def _failure(task: asyncio.Task[None]) -> BaseException | None:
    return None if not task.done() or task.cancelled() else task.exception()
