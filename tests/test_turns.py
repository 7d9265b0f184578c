"""Turns through the HTTP API, with the real agent CLI and the scripted stand-in model."""

from __future__ import annotations

import asyncio

from tests.sse import TERMINAL, Ev, events, names, text_of, turn


async def new_loop(server, **body) -> str:
    r = await server.http.post("/loops", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


async def until(stream, name: str) -> list[Ev]:
    """Read a stream until an event of that name (inclusive)."""
    seen = []
    async for ev in stream:
        if ev.name == "ping":
            continue
        seen.append(ev)
        if ev.name == name:
            return seen
    raise AssertionError(f"stream ended before {name}: {names(seen)}")


async def test_text_turn_streams_deltas_then_done(server):
    loop = await new_loop(server)
    evs = await turn(server.http, loop, "hello")
    assert names(evs)[0] == "started"
    assert evs[0].data["trigger"] == "message" and evs[0].data["cold_start"] is True
    assert names(evs)[-1] == "done"
    assert names(evs).count("assistant_delta") > 1
    assert text_of(evs) == "Echo #1: hello"
    ids = [e.id for e in evs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


async def test_three_turns_keep_the_conversation(server):
    loop = await new_loop(server)
    texts = [text_of(await turn(server.http, loop, f"n{i}")) for i in range(1, 4)]
    assert texts == ["Echo #1: n1", "Echo #2: n2", "Echo #3: n3"]
    detail = (await server.http.get(f"/loops/{loop}")).json()
    assert detail["turn_count"] == 3 and detail["busy"] is False


async def test_bash_tool_runs_in_the_workdir(server):
    loop = await new_loop(server)
    evs = await turn(
        server.http, loop, "[[bash: echo made > made.txt]]", permission_mode="bypassPermissions"
    )
    assert names(evs)[-1] == "done"
    call = next(e for e in evs if e.name == "tool_call")
    assert call.data["tool"] == "Bash" and "made.txt" in call.data["input_summary"]
    result = next(e for e in evs if e.name == "tool_result")
    assert result.data["tool_use_id"] == call.data["tool_use_id"] and result.data["ok"] is True
    workdir = server.engine.sandbox.workdir(loop)
    assert (workdir / "made.txt").read_text() == "made\n"
    assert text_of(evs).startswith("Tool ok")


async def test_failing_tool_reports_not_ok_and_the_turn_goes_on(server):
    loop = await new_loop(server)
    evs = await turn(server.http, loop, "[[bash: false]]", permission_mode="bypassPermissions")
    result = next(e for e in evs if e.name == "tool_result")
    assert result.data["ok"] is False
    assert names(evs)[-1] == "done"
    assert text_of(evs).startswith("Tool failed")


async def _choice_turn(server, loop: str, content: str, answer: dict) -> list[Ev]:
    stream = events(server.http, "POST", f"/loops/{loop}/messages", json={"content": content})
    seen = await until(stream, "requires_choice")
    choice = seen[-1].data
    r = await server.http.post(f"/loops/{loop}/choices/{choice['choice_id']}", json=answer)
    assert r.status_code == 202, r.text
    rest = []
    async for ev in stream:
        rest.append(ev)
        if ev.name in TERMINAL:
            break
    await stream.aclose()
    return seen + rest


async def test_permission_allowed_runs_the_tool(server):
    loop = await new_loop(server)
    evs = await _choice_turn(server, loop, "[[bash: echo ok > allowed.txt]]", {"allow": True})
    choice = next(e for e in evs if e.name == "requires_choice").data
    assert choice["kind"] == "permission"
    assert choice["payload"]["tool"] == "Bash"
    assert "allowed.txt" in choice["payload"]["input_summary"]
    resolved = next(e for e in evs if e.name == "choice_resolved").data
    assert resolved == {"choice_id": choice["choice_id"], "source": "api"}
    assert names(evs)[-1] == "done"
    assert (server.engine.sandbox.workdir(loop) / "allowed.txt").exists()
    history = (await server.http.get(f"/loops/{loop}/messages")).json()["data"]
    [record] = history[0]["choices"]
    assert {key: record[key] for key in ("choice_id", "kind", "answer", "source")} == {
        "choice_id": choice["choice_id"],
        "kind": "permission",
        "answer": {"allow": True},
        "source": "api",
    }


async def test_permission_denied_tells_the_model_and_the_turn_ends_done(server):
    loop = await new_loop(server)
    evs = await _choice_turn(server, loop, "[[bash: echo no > denied.txt]]", {"allow": False})
    assert names(evs)[-1] == "done"
    assert next(e for e in evs if e.name == "tool_result").data["ok"] is False
    assert text_of(evs).startswith("Tool failed")
    assert not (server.engine.sandbox.workdir(loop) / "denied.txt").exists()


async def test_question_answer_reaches_the_model(server):
    loop = await new_loop(server)
    stream = events(server.http, "POST", f"/loops/{loop}/messages", json={"content": "[[ask]]"})
    seen = await until(stream, "requires_choice")
    choice = seen[-1].data
    assert choice["kind"] == "question"
    question = choice["payload"]["questions"][0]
    assert question["id"] == "q1" and question["question"] == "Which color?"
    assert [o["label"] for o in question["options"]] == ["Red", "Blue"]
    assert question["multi_select"] is False
    answer = {"answers": {"q1": "Blue"}, "source": "slack"}
    r = await server.http.post(f"/loops/{loop}/choices/{choice['choice_id']}", json=answer)
    assert r.status_code == 202
    rest = await until(stream, "done")
    await stream.aclose()
    assert next(e for e in rest if e.name == "choice_resolved").data["source"] == "slack"
    assert "Blue" in text_of(rest)
    last_request = str(server.standin_requests()[-1]["messages"][-1])
    assert '"Which color?"="Blue"' in last_request


async def test_message_while_busy_is_queued_then_runs(server):
    loop = await new_loop(server)
    first = asyncio.create_task(turn(server.http, loop, "[[slow: 1.5]]"))
    watcher = events(server.http, "GET", f"/loops/{loop}/events")
    await until(watcher, "assistant_delta")
    second = await turn(server.http, loop, "after")
    await watcher.aclose()
    assert names(second)[0] == "queued" and second[0].data == {"position": 1}
    assert names(second)[1] == "started" and names(second)[-1] == "done"
    assert text_of(second) == "Echo #2: after"
    assert names(await first)[-1] == "done"


async def test_interrupt_in_a_slow_tool(server):
    loop = await new_loop(server)
    stream = events(
        server.http,
        "POST",
        f"/loops/{loop}/messages",
        json={"content": "[[bash: sleep 30]]", "permission_mode": "bypassPermissions"},
    )
    await until(stream, "tool_call")
    r = await server.http.post(f"/loops/{loop}/interrupt")
    assert r.status_code == 202
    rest = await until(stream, "interrupted")
    await stream.aclose()
    assert "done" not in names(rest)
    assert text_of(await turn(server.http, loop, "again")) == "Echo #2: again"
    history = (await server.http.get(f"/loops/{loop}/messages")).json()["data"]
    assert [h["ended"] for h in history] == ["interrupted", "done"]


async def test_interrupt_with_nothing_running_is_accepted(server):
    loop = await new_loop(server)
    assert (await server.http.post(f"/loops/{loop}/interrupt")).status_code == 202


async def test_watcher_mid_turn_gets_a_snapshot_then_the_same_events(server):
    loop = await new_loop(server)
    sender = events(server.http, "POST", f"/loops/{loop}/messages", json={"content": "[[slow: 2]]"})
    before = await until(sender, "assistant_delta")
    watcher = events(server.http, "GET", f"/loops/{loop}/events")
    first = await anext(watcher)
    assert first.name == "snapshot"
    assert first.data["turn_id"] == before[0].data["turn_id"]
    assert first.data["pending_choice_id"] is None
    watched = await until(watcher, "done")
    sent = before + await until(sender, "done")
    await watcher.aclose()
    await sender.aclose()
    so_far = first.data["assistant_text_so_far"]
    assert so_far + text_of(watched) == text_of(sent)
    live = [(e.id, e.name, e.data) for e in watched]
    assert live == [(e.id, e.name, e.data) for e in sent if e.id > first.id]


async def test_watchers_and_sender_see_the_same_deltas(server):
    loop = await new_loop(server)
    opened = [asyncio.Event() for _ in range(3)]
    watchers = [events(server.http, "GET", f"/loops/{loop}/events", opened=o) for o in opened]
    reads = [asyncio.create_task(until(w, "done")) for w in watchers]
    # Answered means subscribed: every watcher sees the turn from its start.
    await asyncio.wait_for(asyncio.gather(*(o.wait() for o in opened)), 30)
    sent = await turn(server.http, loop, "[[long: 40]]")
    for read, watcher in zip(reads, watchers, strict=True):
        seen = await read
        await watcher.aclose()
        assert [(e.id, e.name, e.data) for e in seen] == [(e.id, e.name, e.data) for e in sent]


async def test_idempotent_replay_does_not_run_the_model_again(server):
    loop = await new_loop(server)
    key = {"Idempotency-Key": "k-replay-1"}
    first = await turn(server.http, loop, "once", headers=key)
    calls = len(server.standin_requests())
    again = await turn(server.http, loop, "once", headers=key)
    assert [(e.id, e.name, e.data) for e in again] == [(e.id, e.name, e.data) for e in first]
    assert len(server.standin_requests()) == calls
    r = await server.http.post(f"/loops/{loop}/messages", json={"content": "other"}, headers=key)
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "idempotency_key_reused"
    history = (await server.http.get(f"/loops/{loop}/messages")).json()["data"]
    assert len(history) == 1


async def test_idempotent_resend_while_running_joins_the_live_turn(server):
    loop = await new_loop(server)
    key = {"Idempotency-Key": "k-live-1"}
    sender = events(
        server.http,
        "POST",
        f"/loops/{loop}/messages",
        json={"content": "[[slow: 1.5]]"},
        headers=key,
    )
    await until(sender, "assistant_delta")
    await sender.aclose()  # the client drops; the turn goes on
    again = await turn(server.http, loop, "[[slow: 1.5]]", headers=key)
    assert names(again)[0] == "started" and names(again)[-1] == "done"
    assert len(text_of(again)) > 0
    history = (await server.http.get(f"/loops/{loop}/messages")).json()["data"]
    assert len(history) == 1 and history[0]["assistant_text"] == text_of(again)


async def test_archived_loop_refuses_messages(server):
    loop = await new_loop(server)
    assert (await server.http.delete(f"/loops/{loop}")).status_code == 204
    assert (await server.http.delete(f"/loops/{loop}")).status_code == 204
    r = await server.http.post(f"/loops/{loop}/messages", json={"content": "hi"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "loop_archived"
    listed = (await server.http.get("/loops", params={"archived": "true"})).json()["data"]
    assert loop in [item["id"] for item in listed]


async def test_model_failure_ends_the_turn_with_agent_failed(server):
    loop = await new_loop(server)
    evs = await turn(server.http, loop, "[[fail]]")
    assert names(evs)[-1] == "error"
    assert evs[-1].data["code"] == "agent_failed"
    assert evs[-1].data["turn_id"] == evs[0].data["turn_id"]
    assert text_of(await turn(server.http, loop, "still here")) == "Echo #2: still here"


async def test_thinking_streams_as_thinking_deltas(server):
    loop = await new_loop(server)
    evs = await turn(server.http, loop, "[[think]]")
    assert "thinking_delta" in names(evs)
    assert text_of(evs) == "Thought about it."


async def collect(stream, terminals: int) -> list[Ev]:
    """Read a stream until it has carried that many terminal events."""
    seen = []
    async for ev in stream:
        seen.append(ev)
        if sum(e.name in TERMINAL for e in seen) == terminals:
            return seen
    raise AssertionError(f"stream ended early: {names(seen)}")


async def test_background_wake_is_a_turn_of_its_own(server):
    loop = await new_loop(server)
    opened = asyncio.Event()
    watcher = events(server.http, "GET", f"/loops/{loop}/events", opened=opened)
    watched = asyncio.create_task(collect(watcher, terminals=2))
    await asyncio.wait_for(opened.wait(), 30)
    first = await turn(
        server.http,
        loop,
        "[[bashbg: sleep 1; echo bg > bg.txt]]",
        permission_mode="bypassPermissions",
    )
    assert names(first)[-1] == "done"
    seen = await asyncio.wait_for(watched, 30)
    await watcher.aclose()
    woke = seen[len(first) :]
    assert woke[0].name == "started" and woke[0].data["trigger"] == "background"
    assert woke[0].data["turn_id"] != first[0].data["turn_id"]
    assert names(woke)[-1] == "done"
    assert text_of(woke) == "Background task finished."
    assert (server.engine.sandbox.workdir(loop) / "bg.txt").read_text() == "bg\n"
    history = (await server.http.get(f"/loops/{loop}/messages")).json()["data"]
    assert [h["trigger"] for h in history] == ["message", "background"]
    assert history[1]["assistant_text"] == "Background task finished."


async def test_agent_killed_mid_turn_ends_it_and_the_next_turn_resumes(server):
    loop = await new_loop(server)
    assert text_of(await turn(server.http, loop, "remember me")) == "Echo #1: remember me"
    # The Bash tool's parent is the agent CLI itself.
    evs = await turn(
        server.http, loop, "[[bash: kill -9 $PPID]]", permission_mode="bypassPermissions"
    )
    assert names(evs)[-2:] == ["tool_call", "error"], names(evs)  # killed by its own tool
    assert evs[-1].data["code"] == "agent_failed"
    evs = await turn(server.http, loop, "still here")
    assert evs[0].data["cold_start"] is True
    # The same Claude session, resumed (a new one would say #1). The killed turn's message
    # is in its transcript when the CLI wrote it before it died, which is a matter of timing.
    assert text_of(evs) in ("Echo #2: still here", "Echo #3: still here")
