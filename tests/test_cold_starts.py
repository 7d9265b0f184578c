"""LOOPBRIDGE_MAX_STARTING: agent cold starts beyond the bound wait their turn, and run."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY

from tests.conftest import start_server, stop_server
from tests.sse import names, turn


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_cold_starts_queue_beyond_max_starting(standin, tmp_path) -> None:
    server = await start_server(tmp_path, max_starting=1)
    try:
        loops = [(await server.http.post("/loops", json={})).json()["id"] for _ in range(2)]
        queued_before = sample("loopbridge_agent_starts_queued_total")
        most_starting = 0.0
        most_waiting = 0.0

        async def watch() -> None:
            nonlocal most_starting, most_waiting
            while True:
                most_starting = max(most_starting, sample("loopbridge_agents_starting"))
                most_waiting = max(most_waiting, sample("loopbridge_agent_starts_waiting"))
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        try:
            first, second = await asyncio.gather(
                *(turn(server.http, loop, f"hello {n}") for n, loop in enumerate(loops))
            )
        finally:
            watcher.cancel()
        for evs, n in ((first, 0), (second, 1)):
            assert names(evs)[-1] == "done", evs
            started = next(e for e in evs if e.name == "started")
            assert started.data["cold_start"] is True
            assert "".join(e.data["text"] for e in evs if e.name == "assistant_delta") == (
                f"Echo #1: hello {n}"
            )
        # One start at a time: the second waited for the first.
        assert sample("loopbridge_agent_starts_queued_total") - queued_before == 1
        assert most_starting == 1
        assert most_waiting == 1
        assert sample("loopbridge_agents_starting") == 0
        # A warm agent's turn does not pass the gate.
        assert names(await turn(server.http, loops[0], "again"))[-1] == "done"
        assert sample("loopbridge_agent_starts_queued_total") - queued_before == 1
    finally:
        await stop_server(server)


async def test_max_starting_defaults_to_two_per_core(tmp_path) -> None:
    import os

    from core.config import load_settings

    assert load_settings(home=tmp_path).max_starting == 2 * (os.cpu_count() or 1)
