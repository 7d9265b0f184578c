"""What every platform adapter is around its platform's own part: start, stop, run
until stopped, wait until idle, and the handlers of the platform's events.

A platform subclasses `AdapterShell` and fills in `_connect` (log in and start taking
events), `_serve` (the run until the platform connection ends), `_stop_listening`
(stop taking events) and `_disconnect` (close what is left); everything neutral —
the conversations, the outcomes kept for tests and status, the handler tasks, the
order of a stop — is here.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Coroutine
from typing import Any, ClassVar

from adapters.conversations import Conversations, TurnResult
from adapters.routing import Routes
from adapters.settings import AdapterSettings
from adapters.tasks import HandlerTasks
from adapters.views import OutcomeMarks
from bridge.client import LoopClient

log = logging.getLogger(__name__)

# The latest outcomes kept, for tests and status; bounded so a long run does not grow.
RESULTS_KEPT = 1000
# Seconds a stop lets the turns in flight finish their last edits.
STOP_GRACE = 5.0


class AdapterShell:
    """Runs one platform app against one Loop API client (`start`, then `stop`)."""

    platform: ClassVar[str]
    # How the platform writes who decided a choice (its emoji and markup).
    outcome_marks: ClassVar[OutcomeMarks]

    def __init__(self, settings: AdapterSettings, client: LoopClient) -> None:
        self.client = client
        self.conversations = Conversations(
            client,
            settings.policy(),
            platform=self.platform,
            permission_mode=settings.permission_mode,
            routes=Routes.load(self.platform),
        )
        self.results: deque[TurnResult] = deque(maxlen=RESULTS_KEPT)
        self._tasks = HandlerTasks(log, self.platform)
        self._stopping = False

    async def start(self) -> None:
        """Connect; on failure, what was started is stopped and the error raised
        (PlatformRefused / PlatformUnreachable, one line each, see startup.py)."""
        try:
            await self._connect()
        except BaseException:
            await self.stop()
            raise

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop taking events, let turns in flight finish (up to `grace` s), disconnect.
        Stopping twice is harmless."""
        self._stopping = True
        await self._stop_listening()
        await self._tasks.drain(grace)
        await self.conversations.close()
        await self._disconnect()

    async def run_forever(self) -> None:
        await self.start()
        try:
            await self._serve()
        finally:
            await self.stop()

    async def idle(self) -> None:
        """Wait until no message or click is being handled (tests, shutdown)."""
        await self._tasks.idle()

    def spawn(self, work: Coroutine[Any, Any, object]) -> None:
        """Handle a platform event in a task of its own; none once stopping."""
        if self._stopping:
            work.close()
            return
        self._tasks.spawn(work)

    # ---- the platform's part -------------------------------------------------------------

    async def _connect(self) -> None:
        raise NotImplementedError

    async def _serve(self) -> None:
        """Until the platform connection ends (by default: until cancelled)."""
        await asyncio.Event().wait()

    async def _stop_listening(self) -> None:
        """Take no more events (the calls that show turns still work)."""

    async def _disconnect(self) -> None:
        """Close what is left of the platform connection."""
