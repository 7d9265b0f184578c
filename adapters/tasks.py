"""The handlers an adapter runs for platform events, tracked so it can wait for them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any


class HandlerTasks:
    """Each platform event is handled in a task of its own, so a slow turn never holds up
    the platform's event loop (Slack wants an ack within 3 s, Discord the same)."""

    def __init__(self, log: logging.Logger, platform: str) -> None:
        self._log = log
        self._platform = platform
        self._tasks: set[asyncio.Task[Any]] = set()

    def __bool__(self) -> bool:
        return bool(self._tasks)

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    async def idle(self) -> None:
        """Wait until no handler runs (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def drain(self, grace: float) -> None:
        """Let handlers in flight finish for up to `grace` seconds, then cancel the rest."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(self._tasks, timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.error("%s handler failed", self._platform, exc_info=task.exception())
