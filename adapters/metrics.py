"""The adapters' Prometheus metrics; the server's `/metrics` shows them once an adapter runs
in its process (an adapter run alone against a remote server keeps them to itself)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from prometheus_client import Counter, Histogram

EDIT_LAG_BUCKETS = (0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 30, 60)

ADAPTER_MESSAGES = Counter(
    "loopbridge_adapter_messages",
    "People's messages handled, by outcome",
    ["platform", "outcome"],
)
PLATFORM_CALLS = Counter(
    "loopbridge_adapter_platform_calls",
    "Calls to the platform's API, by method and status",
    ["platform", "method", "status"],
)
RATE_LIMITED = Counter(
    "loopbridge_adapter_rate_limited",
    "429 answers from the platform (each is waited out)",
    ["platform", "method"],
)
EDIT_LAG = Histogram(
    "loopbridge_adapter_edit_lag_seconds",
    "From new answer text reaching the adapter to a platform message showing it",
    ["platform"],
    buckets=EDIT_LAG_BUCKETS,
)

T = TypeVar("T")


async def counted(
    platform: str, method: str, call: Callable[[], Awaitable[T]], status_of: Callable[[Any], str]
) -> T:
    """Make one platform call, counting it under the status `status_of` names for its
    outcome (the result, or the exception it raised)."""
    try:
        result = await call()
    except Exception as exc:
        PLATFORM_CALLS.labels(platform, method, status_of(exc)).inc()
        raise
    PLATFORM_CALLS.labels(platform, method, status_of(result)).inc()
    return result


class LagClock:
    """When shown text started to lag behind the text received (see render.py)."""

    def __init__(self, platform: str) -> None:
        self._histogram = EDIT_LAG.labels(platform) if platform else None
        self._since: float | None = None

    def text_arrived(self) -> None:
        if self._since is None:
            self._since = time.monotonic()

    def shown(self) -> None:
        if self._since is not None and self._histogram is not None:
            self._histogram.observe(time.monotonic() - self._since)
        self._since = None
