"""Remembering recently seen platform events, so a redelivered one is dropped.

The Loop API's Idempotency-Key already keeps a redelivered message from running
the agent twice; this keeps the adapter from rendering its reply twice.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

# Slack retries an unacknowledged event for about 5 minutes.
DEFAULT_TTL = 900.0
DEFAULT_SIZE = 10_000


class RecentKeys:
    def __init__(
        self,
        ttl: float = DEFAULT_TTL,
        size: int = DEFAULT_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.size = size
        self.clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    def first_time(self, key: str) -> bool:
        """True the first time `key` is seen within the window; records it."""
        now = self.clock()
        while self._seen:
            oldest, seen_at = next(iter(self._seen.items()))
            if now - seen_at < self.ttl and len(self._seen) < self.size:
                break
            del self._seen[oldest]
        if key in self._seen:
            return False
        self._seen[key] = now
        return True
