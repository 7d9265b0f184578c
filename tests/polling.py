"""Waiting in tests for something a person would see, with a deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def until(check: Callable[[], object], within: float = 30.0, what: str = "") -> object:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.05)


async def until_async(
    get: Callable[[], Awaitable[T]],
    check: Callable[[T], object],
    within: float = 30.0,
    what: str = "",
) -> T:
    """`await get()` again until `check` accepts what it gave; that value."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await get()
        if check(value):
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.05)
