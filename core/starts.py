"""Bounded agent cold starts: a burst of them is what saturates a machine first.

At most `LOOPBRIDGE_MAX_STARTING` agents start at once on this replica (a sandbox
acquired and the CLI up to its first answer); the others queue in arrival order.
A warm agent's turn never passes here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from core import metrics


class StartGate:
    def __init__(self, limit: int) -> None:
        self._slots = asyncio.Semaphore(limit)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Held while one agent starts."""
        if self._slots.locked():
            metrics.AGENT_STARTS_QUEUED.inc()
            with metrics.AGENT_STARTS_WAITING.track_inprogress():
                await self._slots.acquire()
        else:
            await self._slots.acquire()
        try:
            with metrics.AGENTS_STARTING.track_inprogress():
                yield
        finally:
            self._slots.release()
