"""How long to wait after failures in a row: tenacity's exponential backoff, for the
retries that are not a loop around one call (the renderer schedules a message's next
try among its other work; see render.py)."""

from __future__ import annotations

from tenacity import RetryCallState, Retrying, wait_exponential


def exponential(first: float, most: float) -> wait_exponential:
    """`first`, then twice as long each time, at most `most` seconds."""
    return wait_exponential(multiplier=first, max=most)


def delay_after(wait: wait_exponential, failures: int) -> float:
    """The wait after the `failures`-th failure in a row (1: the first)."""
    state = RetryCallState(Retrying(), None, (), {})
    state.attempt_number = failures
    return wait(state)
