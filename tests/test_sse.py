"""The server's event streams: frames encoded once, pings, and a clean end at shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from bridge.server import sse
from core.events import Event
from tests.conftest import start_server
from tests.sse import Ev, events


def test_each_event_is_framed_once_and_shared() -> None:
    cache = sse.FrameCache(size=2)
    delta = Event.make("assistant_delta", {"text": "hi"}, 7, "turn_1")
    frame = cache.frame(delta)
    assert frame == b'id: 7\r\nevent: assistant_delta\r\ndata: {"text":"hi"}\r\n\r\n'
    assert cache.frame(delta) is frame  # the same bytes for every stream
    # An event without an id (not stored) has no id line; an equal event is its own entry.
    assert cache.frame(Event.make("done", {}, None, "t")) == b"event: done\r\ndata: {}\r\n\r\n"
    for n in range(5):  # more than the cache holds: the oldest are encoded again, alike
        cache.frame(Event.make("assistant_delta", {"text": str(n)}, n))
    assert cache.frame(delta) == frame


async def test_a_quiet_stream_pings_and_shutdown_ends_it_cleanly(
    standin: object, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sse, "PING_SECONDS", 0.2)
    server = await start_server(tmp_path_factory.mktemp("sse"))
    stopped = False
    try:
        loop = (await server.http.post("/loops", json={})).json()["id"]
        http = server.client(server.token)  # its own: stopping closes the server's client
        watch = events(http, "GET", f"/loops/{loop}/events")
        first = await asyncio.wait_for(anext(watch), 30)
        assert (first.name, first.data, first.id) == ("ping", {}, None)
        # The server stops with the stream open: the stream ends (the body is complete),
        # well before uvicorn's graceful timeout (2 s in tests) would cut it.
        began = asyncio.get_running_loop().time()
        rest = asyncio.create_task(_drain(watch))
        await server.stop()
        stopped = True
        assert {ev.name for ev in await asyncio.wait_for(rest, 30)} <= {"ping"}
        assert asyncio.get_running_loop().time() - began < 1.5
        await http.aclose()
    finally:
        if not stopped:
            await server.stop()
        await server.engine.close()


async def _drain(stream: AsyncIterator[Ev]) -> list[Ev]:
    return [ev async for ev in stream]
