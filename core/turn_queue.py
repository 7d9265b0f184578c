"""A loop's queue of turns: first in, first out, taken by the loop's one worker."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator

from core.turn import Turn


class TurnQueue:
    """Turns waiting for the agent. `take` waits until a turn is there and the caller's
    condition holds (no turn running): the worker is the only taker, so one wake-up
    event is enough and no turn ever leaves the queue before it can start."""

    def __init__(self) -> None:
        self._turns: deque[Turn] = deque()
        self._changed = asyncio.Event()

    def put(self, turn: Turn) -> None:
        self._turns.append(turn)
        # The worker looks on the event loop's next pass, not at once: the request that
        # queued the turn starts its stream first, behind the watchers already waiting, as
        # every reader that comes later is (bench/README.md, fan-out: watchers vs sender).
        asyncio.get_running_loop().call_soon(self._changed.set)

    def wake(self) -> None:
        """Something `take`'s condition reads changed: look again."""
        self._changed.set()

    async def take(self, ready: Callable[[], bool]) -> Turn:
        while not (self._turns and ready()):
            # Cleared only after a check that nothing can interrupt: no wake-up is lost.
            self._changed.clear()
            await self._changed.wait()
        return self._turns.popleft()

    def clear(self) -> None:
        self._turns.clear()

    def __len__(self) -> int:
        return len(self._turns)

    def __bool__(self) -> bool:
        return bool(self._turns)

    def __iter__(self) -> Iterator[Turn]:
        return iter(self._turns)
