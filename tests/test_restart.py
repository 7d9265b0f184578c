"""A loop outlives its server: conversation, idempotency records and the event log."""

from __future__ import annotations

import asyncio

from tests.conftest import start_server, stop_server
from tests.sse import events, names, text_of, turn


async def test_restart_between_turns_keeps_everything(standin, tmp_path):
    first_server = await start_server(tmp_path)
    token = first_server.token
    loop = (await first_server.http.post("/loops", json={"title": "durable"})).json()["id"]
    key = {"Idempotency-Key": "before-restart"}
    before = await turn(first_server.http, loop, "before", headers=key)
    assert text_of(before) == "Echo #1: before"
    await stop_server(first_server)

    server = await start_server(tmp_path)
    try:
        http = server.client(token)  # the token survived too
        after = await turn(http, loop, "after")
        assert after[0].name == "started" and after[0].data["cold_start"] is True
        assert text_of(after) == "Echo #2: after"  # the agent resumed the same session
        assert after[0].id > before[-1].id

        calls = len(standin.main_requests())
        replay = await turn(http, loop, "before", headers=key)
        assert [(e.id, e.name, e.data) for e in replay] == [(e.id, e.name, e.data) for e in before]
        assert len(standin.main_requests()) == calls

        resume_from = before[1].id
        seen = []
        async for ev in events(
            http, "GET", f"/loops/{loop}/events", headers={"Last-Event-ID": str(resume_from)}
        ):
            seen.append(ev)
            if ev.id == after[-1].id:
                break
        expected = [e for e in before + after if e.id > resume_from]
        assert [(e.id, e.name, e.data) for e in seen] == [(e.id, e.name, e.data) for e in expected]
        await http.aclose()
    finally:
        await stop_server(server)


async def test_turn_open_when_the_server_stops_ends_with_an_error(standin, tmp_path):
    first_server = await start_server(tmp_path)
    token = first_server.token
    loop = (await first_server.http.post("/loops", json={})).json()["id"]
    stream = events(
        first_server.http, "POST", f"/loops/{loop}/messages", json={"content": "[[slow: 5]]"}
    )
    async for ev in stream:
        if ev.name == "assistant_delta":
            break
    await stop_server(first_server)
    await asyncio.sleep(0)

    server = await start_server(tmp_path)
    try:
        http = server.client(token)
        history = (await http.get(f"/loops/{loop}/messages")).json()["data"]
        assert history[0]["ended"] == "error"
        assert history[0]["error"]["code"] == "agent_failed"
        logged = []
        async for ev in events(
            http, "GET", f"/loops/{loop}/events", headers={"Last-Event-ID": "0"}
        ):
            logged.append(ev)
            if ev.name == "error":
                break
        assert names(logged)[0] == "started" and logged[-1].data["turn_id"] == history[0]["turn_id"]
        assert text_of(await turn(http, loop, "next")) == "Echo #2: next"
        await http.aclose()
    finally:
        await stop_server(server)


async def test_idle_agent_is_stopped_and_the_next_turn_resumes_it(standin, tmp_path):
    server = await start_server(tmp_path, agent_idle_seconds=0.5)
    try:
        loop = (await server.http.post("/loops", json={})).json()["id"]
        first = await turn(server.http, loop, "one")
        warm = await turn(server.http, loop, "two")
        assert first[0].data["cold_start"] is True and warm[0].data["cold_start"] is False
        runtime = server.engine._runtimes[loop]
        for _ in range(100):
            if runtime.agent is None:
                break
            await asyncio.sleep(0.05)
        assert runtime.agent is None, "the idle agent was not stopped"
        resumed = await turn(server.http, loop, "three")
        assert resumed[0].data["cold_start"] is True
        assert text_of(resumed) == "Echo #3: three"
    finally:
        await stop_server(server)


async def test_unanswered_choice_is_evicted_with_the_sandbox(standin, tmp_path):
    server = await start_server(tmp_path, sandbox_idle_seconds=1)
    try:
        loop = (await server.http.post("/loops", json={})).json()["id"]
        evs = await turn(server.http, loop, "[[bash: echo hi > evicted.txt]]")
        assert names(evs)[-2:] == ["requires_choice", "error"]
        assert evs[-1].data["code"] == "sandbox_evicted"
        assert not (server.engine.sandbox.workdir(loop) / "evicted.txt").exists()
        after = await turn(server.http, loop, "after")
        assert names(after)[0] == "started", [(e.name, e.data) for e in after]
        assert after[0].data["cold_start"] is True
        assert text_of(after) == "Echo #2: after"
    finally:
        await stop_server(server)
