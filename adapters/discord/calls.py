"""Counting the Discord adapter's REST calls, by route and status, for `/metrics`."""

from __future__ import annotations

from typing import Any

import discord

from adapters import metrics
from adapters.discord.incoming import PLATFORM


def _status(outcome: Any) -> str:
    if isinstance(outcome, discord.HTTPException):
        return str(outcome.status)
    if isinstance(outcome, Exception):
        return "failed"
    return "ok"


def count_calls(http: discord.http.HTTPClient) -> None:
    """Wrap the client's one request method; discord.py waits out 429s inside it, so a
    429 shows here only when it gives up."""
    request = http.request

    async def counted_request(route: discord.http.Route, **kwargs: Any) -> Any:
        method = f"{route.method} {route.path}"  # the route's template, never an id
        return await metrics.counted(PLATFORM, method, lambda: request(route, **kwargs), _status)

    http.request = counted_request  # type: ignore[method-assign]
