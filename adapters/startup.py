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

from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from adapters.backoff import exponential

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

    def tell(state: RetryCallState) -> None:
        failure = state.outcome.exception() if state.outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        report(f"{failure}; trying again in {delay:.0f} s")

    retrying = AsyncRetrying(
        retry=retry_if_exception_type(PlatformUnreachable),
        wait=exponential(first_delay, MAX_BACKOFF),
        before_sleep=tell,
        reraise=True,
    )
    try:
        return await retrying(start)
    except PlatformRefused as exc:
        report(f"{exc}; it stays off (fix the setting and restart)")
        return None
