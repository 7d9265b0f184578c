"""The fan-out channel: order, release timing, filters and slow readers."""

from __future__ import annotations

import asyncio

import pytest

from core.events import (
    BATCH_WINDOW,
    SUBSCRIBER_BACKLOG,
    TRIM_EVERY,
    Channel,
    Event,
    Overflow,
    Subscription,
)


def delta(n: int) -> Event:
    return Event.make("assistant_delta", {"text": str(n)}, n, "turn_1")


def tool(n: int) -> Event:
    return Event.make("tool_call", {"n": n}, n, "turn_1")


async def next_batch(sub: Subscription, seconds: float = 1.0) -> list[int]:
    async with asyncio.timeout(seconds):
        batch = await anext(aiter(sub.batches()))
    return [event.seq or 0 for event in batch]


async def test_readers_get_what_was_published_after_they_subscribed_in_order():
    channel = Channel()
    channel.publish(tool(1))
    early = channel.subscribe()
    channel.publish(tool(2))
    late = channel.subscribe()
    channel.publish(tool(3))
    assert await next_batch(early) == [2, 3]
    assert await next_batch(late) == [3]


async def test_deltas_within_the_window_go_out_together_and_other_events_at_once():
    channel = Channel()
    sub = channel.subscribe()
    loop = asyncio.get_running_loop()
    channel.publish(delta(1))  # the first after a quiet window goes at once
    assert await next_batch(sub) == [1]
    released = loop.time()
    for n in range(2, 6):
        channel.publish(delta(n))
    assert await next_batch(sub) == [2, 3, 4, 5]
    assert loop.time() - released >= BATCH_WINDOW * 0.9
    channel.publish(delta(6))
    channel.publish(tool(7))  # ends the wait for the delta before it too
    started = loop.time()
    assert await next_batch(sub) == [6, 7]
    channel.publish(delta(8))  # the first delta after another event is not held
    assert await next_batch(sub) == [8]
    assert loop.time() - started < BATCH_WINDOW


async def test_a_reader_joining_while_deltas_wait_sees_only_its_own():
    channel = Channel()
    first = channel.subscribe()
    channel.publish(delta(1))
    assert await next_batch(first) == [1]
    channel.publish(delta(2))  # waits for the window
    second = channel.subscribe()
    channel.publish(delta(3))
    assert await next_batch(first) == [2, 3]
    assert await next_batch(second) == [3]


async def test_filtered_reader_skips_what_it_does_not_accept():
    channel = Channel()
    mine = channel.subscribe(lambda e: e.turn_id == "turn_2")
    channel.publish(tool(1))
    channel.publish(Event.make("done", {}, 2, "turn_2"))
    assert await next_batch(mine) == [2]


async def test_a_reader_too_far_behind_is_cut_off_and_the_others_go_on():
    channel = Channel()
    slow, fast = channel.subscribe(), channel.subscribe()
    total = SUBSCRIBER_BACKLOG + 2 * TRIM_EVERY
    seen = 0
    for n in range(1, total + 1):
        channel.publish(tool(n))
        if n % 500 == 0:
            seen += len(await next_batch(fast))
    seen += len(await next_batch(fast))
    assert seen == total
    with pytest.raises(Overflow):
        await next_batch(slow)
