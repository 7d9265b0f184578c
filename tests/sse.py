"""Reading the API's event streams in tests, with the same SSE parser clients use."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from bridge.contract.events import TERMINAL


@dataclass
class Ev:
    name: str
    data: dict[str, Any]
    id: int | None


async def events(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    opened: asyncio.Event | None = None,
    **kwargs: Any,
) -> AsyncIterator[Ev]:
    """The stream's events; `opened` is set once the server answered (a `GET /events`
    watcher is subscribed by then)."""
    async with aconnect_sse(http, method, url, **kwargs) as source:
        if source.response.status_code != 200:
            await source.response.aread()
            raise AssertionError(f"{source.response.status_code}: {source.response.text}")
        if opened is not None:
            opened.set()
        async for sse in source.aiter_sse():
            yield Ev(sse.event, json.loads(sse.data), int(sse.id) if sse.id else None)


async def turn(http: httpx.AsyncClient, loop_id: str, content: str, **body: Any) -> list[Ev]:
    """Send a message and read its stream to the terminal event."""
    headers = body.pop("headers", {})
    seen = []
    async for ev in events(
        http,
        "POST",
        f"/loops/{loop_id}/messages",
        json={"content": content, **body},
        headers=headers,
    ):
        if ev.name == "ping":
            continue
        seen.append(ev)
        if ev.name in TERMINAL:
            break
    return seen


def text_of(evs: list[Ev]) -> str:
    return "".join(e.data["text"] for e in evs if e.name == "assistant_delta")


def names(evs: list[Ev]) -> list[str]:
    return [e.name for e in evs]
