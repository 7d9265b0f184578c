"""Starting an adapter on its platform: what can go wrong, as one line, and what then.

A platform adapter turns its client library's errors at start into one of two:

- `PlatformRefused`: the platform said no to the credentials or the app's setup
  (a revoked token, a missing intent). Trying again cannot help.
- `PlatformUnreachable`: the platform could not be reached (network, DNS, an
  outage). It may come back.

Alone (`loopbridge slack`), either ends the command with its line. Inside
`loopbridge serve`, the API keeps serving either way: a refused adapter stays off
(one line says why), an unreachable one tries again with backoff.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

# Seconds between tries while a platform is unreachable: 1, 2, 4 … at most this.
MAX_BACKOFF = 60.0


class PlatformError(Exception):
    """The adapter could not start on its platform; the message says why, in one line."""


class PlatformRefused(PlatformError):
    pass


class PlatformUnreachable(PlatformError):
    pass


def unreachable(platform: str, url: str, exc: BaseException) -> PlatformUnreachable:
    reason = str(exc).strip() or type(exc).__name__
    return PlatformUnreachable(f"cannot reach {platform} at {url}: {reason}")


async def start_with_retries(
    start: Callable[[], Awaitable[T]], report: Callable[[str], None], first_delay: float = 1.0
) -> T | None:
    """`start()` again while the platform is unreachable, waiting longer each time;
    None once the platform refuses. Each failure is reported in one line."""
    delay = first_delay
    while True:
        try:
            return await start()
        except PlatformRefused as exc:
            report(f"{exc}; it stays off (fix the setting and restart)")
            return None
        except PlatformUnreachable as exc:
            report(f"{exc}; trying again in {delay:.0f} s")
        await asyncio.sleep(delay)
        delay = min(MAX_BACKOFF, delay * 2)
