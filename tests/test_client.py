"""LoopClient and its in-process transport, against the real server, engine, CLI and stand-in."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, cast

import httpx
import pytest
import pytest_asyncio
import uvicorn
from fastapi import FastAPI

from bridge.client import IN_PROCESS_URL, LoopApiError, LoopClient, Reconnect
from bridge.client.asgi import Message, Receive, Send, StreamingASGITransport
from bridge.contract.events import (
    EVENT_DATA,
    FRAMES,
    TERMINAL,
    DoneFrame,
    LoopEvent,
    StartedFrame,
)
from bridge.server.app import create_app
from bridge.standin import StandinModel
from core.config import load_settings
from core.engine import Engine

PASSWORD = "correct horse"
FAST_RECONNECT = Reconnect(attempts=3, first_delay=0.01)
Connect = Callable[..., LoopClient]


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Engine]:
    model = StandinModel()
    url = await model.start()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ANTHROPIC_BASE_URL", url)
        env.setenv("ANTHROPIC_API_KEY", "sk-standin")
        env.setenv("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        env.setenv("CLAUDE_CODE_MAX_RETRIES", "1")
        engine = Engine(load_settings(home=tmp_path_factory.mktemp("home")))
        await engine.start()
        for user in ("alice", "bob"):
            await engine.accounts.add_user(user, PASSWORD)
        yield engine
        await engine.close()
    await model.stop()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def app(engine: Engine) -> FastAPI:
    return create_app(engine, manage_engine=False)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def http_url(app: FastAPI) -> AsyncIterator[str]:
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
    listener = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[listener]))
    # The socket already listens, so connections wait in its backlog until uvicorn serves.
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    server.should_exit = True
    await task


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def tokens(engine: Engine) -> dict[str, str]:
    return {
        user: (await engine.accounts.create_token(user, "tests"))[1] for user in ("alice", "bob")
    }


@pytest.fixture(params=["in_process", "http"])
def connect(request: pytest.FixtureRequest, app: FastAPI) -> Connect:
    """Makes clients of one server, in-process or over real HTTP (the parameter)."""
    if request.param == "in_process":
        return lambda token=None: LoopClient.in_process(app, token)
    url = request.getfixturevalue("http_url")
    return lambda token=None: LoopClient(url, token)


@pytest_asyncio.fixture(loop_scope="session")
async def alice(connect: Connect, tokens: dict[str, str]) -> AsyncIterator[LoopClient]:
    async with connect(tokens["alice"]) as client:
        yield client


async def collect(
    events: AsyncGenerator[LoopEvent, None], count: int | None = None
) -> list[LoopEvent]:
    """The events up to the first terminal one, or the first `count`; then the stream closes."""
    collected: list[LoopEvent] = []
    async with contextlib.aclosing(events):
        async for event in events:
            collected.append(event)
            if event.event in TERMINAL or len(collected) == count:
                break
    return collected


def text_of(events: list[LoopEvent]) -> str:
    return "".join(e.data.text for e in events if e.event == "assistant_delta")


def names(events: list[LoopEvent]) -> list[str]:
    return [e.event for e in events]


def unique() -> str:
    return uuid.uuid4().hex


# ---- resources ---------------------------------------------------------------------------


async def test_create_get_and_find_by_metadata(alice: LoopClient) -> None:
    thread = unique()
    bound = await alice.create_loop(title="bound", metadata={"thread": thread, "team": "T1"})
    await alice.create_loop(metadata={"thread": unique(), "team": "T1"})

    detail = await alice.get_loop(bound.id.removeprefix("loop_"))
    page = await alice.list_loops(metadata={"thread": thread, "team": "T1"})

    assert detail.id == bound.id and detail.title == "bound" and detail.created_by == "alice"
    assert (detail.busy, detail.queue_depth, detail.turn_count) == (False, 0, 0)
    assert [loop.id for loop in page.data] == [bound.id] and not page.has_more
    assert await alice.find_loop({"thread": thread}) == bound
    assert await alice.find_loop({"thread": thread, "team": "T2"}) is None


async def test_defaults_paging_and_archive(alice: LoopClient) -> None:
    team = unique()
    first = await alice.create_loop(metadata={"team": team})
    second = await alice.create_loop(metadata={"team": team})

    newest = await alice.list_loops(limit=1, metadata={"team": team})
    older = await alice.list_loops(limit=1, after=newest.last_id, metadata={"team": team})
    await alice.archive_loop(first.id)
    await alice.archive_loop(first.id)
    archived = await alice.list_loops(archived=True, metadata={"team": team})

    assert (first.title, first.vault, first.repo, first.profiles) == (
        "untitled",
        "default",
        None,
        [],
    )
    assert [newest.data[0].id, older.data[0].id] == [second.id, first.id]
    assert newest.has_more and not older.has_more
    assert [loop.id for loop in archived.data] == [first.id] and archived.data[0].archived
    assert await alice.find_loop({"team": team}) == second
    with pytest.raises(LoopApiError) as archived_send:
        await collect(alice.send(first.id, "hello"))
    assert (archived_send.value.status, archived_send.value.code) == (400, "loop_archived")


async def test_errors_carry_status_type_and_code(
    alice: LoopClient, connect: Connect, tokens: dict[str, str]
) -> None:
    loop = await alice.create_loop()

    async def get_as(token: str | None) -> None:
        async with connect(token) as client:
            await client.get_loop(loop.id)

    cases: list[tuple[tuple[int, str, str], Callable[[], Awaitable[Any]]]] = [
        ((404, "not_found_error", "loop_not_found"), lambda: alice.get_loop("loop_" + "0" * 24)),
        ((403, "permission_error", "not_loop_owner"), lambda: get_as(tokens["bob"])),
        ((401, "authentication_error", "invalid_token"), lambda: get_as("la_" + "0" * 48)),
        ((401, "authentication_error", "missing_credentials"), lambda: get_as(None)),
        ((401, "authentication_error", "missing_credentials"), alice.list_tokens),
        (
            (404, "not_found_error", "choice_not_found"),
            lambda: alice.answer_choice(loop.id, "choice_nope", allow=True),
        ),
    ]
    for expected, call in cases:
        with pytest.raises(LoopApiError) as caught:
            await call()
        error = caught.value
        assert (error.status, error.type, error.code) == expected
        assert error.message


async def test_errors_before_a_stream_starts_are_raised(
    alice: LoopClient, connect: Connect, tokens: dict[str, str]
) -> None:
    loop = await alice.create_loop()
    async with connect(tokens["bob"]) as bob:
        with pytest.raises(LoopApiError) as not_owner:
            await collect(bob.send(loop.id, "hello"))
        with pytest.raises(LoopApiError) as not_owner_watch:
            await collect(bob.watch(loop.id))
    with pytest.raises(LoopApiError) as not_found:
        await collect(alice.send("loop_" + "0" * 24, "hello"))
    assert not_owner.value.code == not_owner_watch.value.code == "not_loop_owner"
    assert not_found.value.code == "loop_not_found"
    with pytest.raises(ValueError, match="exactly one"):
        await alice.answer_choice(loop.id, "choice_x", allow=True, answers={"q1": "A"})


# ---- sending -----------------------------------------------------------------------------


async def test_send_streams_the_echo_then_done(alice: LoopClient) -> None:
    loop = await alice.create_loop()
    events = await collect(alice.send(loop.id, "hello"))

    assert names(events)[0] == "started" and names(events)[-1] == "done"
    assert set(names(events)[1:-1]) == {"assistant_delta"}
    assert text_of(events) == "Echo #1: hello"
    ids = [e.id or 0 for e in events]
    assert ids == sorted(set(ids))
    assert events[0].data.turn_id == events[-1].data.turn_id


async def test_an_event_the_client_does_not_know_is_skipped() -> None:
    """A newer server may send an event this client has no model for: it is left out."""
    frames = (
        b'id: 1\r\nevent: started\r\ndata: {"turn_id":"t","cold_start":false,'
        b'"trigger":"message"}\r\n\r\n'
        b"id: 2\r\nevent: from_a_newer_server\r\ndata: {}\r\n\r\n"
        b'id: 3\r\nevent: done\r\ndata: {"turn_id":"t"}\r\n\r\n'
    )

    async def newer_server(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": frames})

    async with LoopClient.in_process(newer_server, "token") as client:
        events = await collect(client.send("loop_x", "hi"))
    assert names(events) == ["started", "done"] and [e.id for e in events] == [1, 3]


async def test_send_yields_typed_events(alice: LoopClient) -> None:
    loop = await alice.create_loop()
    events = await collect(alice.send(loop.id, "[[think]]"))
    # Each event is the model of its name (`bridge.contract.events`), its data too.
    assert all(type(e) is FRAMES[e.event] for e in events)
    assert all(type(e.data) is EVENT_DATA[e.event] for e in events)
    started, done = events[0], events[-1]
    assert isinstance(started, StartedFrame) and started.data.trigger == "message"
    assert isinstance(done, DoneFrame) and done.terminal
    assert done.data.turn_id == started.data.turn_id
    assert not started.terminal and "thinking_delta" in names(events)


async def test_event_data_reads_as_a_json_object_too(alice: LoopClient) -> None:
    """Scripts written against the first client read `event.data` as a dict."""
    loop = await alice.create_loop()
    events = await collect(alice.send(loop.id, "hello"))
    started, done = events[0], events[-1]
    assert started.data["turn_id"] == started.data.turn_id and "trigger" in started.data
    assert done.data.get("turn_id") == done.data.turn_id
    assert done.data.get("no such field", "absent") == "absent" and "nope" not in done.data
    with pytest.raises(KeyError):
        done.data["no such field"]


async def test_the_same_idempotency_key_replays_the_same_events(alice: LoopClient) -> None:
    loop = await alice.create_loop()
    key = unique()
    first = await collect(alice.send(loop.id, "hello", idempotency_key=key))
    again = await collect(alice.send(loop.id, "hello", idempotency_key=key))
    history = await alice.history(loop.id)

    assert again == first and text_of(first) == "Echo #1: hello"
    assert len(history.data) == 1
    with pytest.raises(LoopApiError) as reused:
        await collect(alice.send(loop.id, "something else", idempotency_key=key))
    assert (reused.value.status, reused.value.code) == (409, "idempotency_key_reused")


async def test_a_dropped_send_resumes_with_the_same_key(alice: LoopClient) -> None:
    loop = await alice.create_loop()
    key = unique()
    # Closing the stream after `started` and one delta drops the connection; the turn goes on.
    before_drop = await collect(alice.send(loop.id, "[[slow: 1]]", idempotency_key=key), 2)
    resumed = await collect(alice.send(loop.id, "[[slow: 1]]", idempotency_key=key))
    uninterrupted = await collect(alice.watch(loop.id, last_event_id=0))
    history = await alice.history(loop.id)

    assert names(before_drop) == ["started", "assistant_delta"]
    assert resumed[:2] == before_drop and len(history.data) == 1
    assert resumed == uninterrupted and names(resumed)[-1] == "done"
    assert text_of(resumed) == "".join(f"slow {n}/10. " for n in range(1, 11))


async def test_a_failed_turn_ends_with_an_error_event(alice: LoopClient) -> None:
    loop = await alice.create_loop()
    events = await collect(alice.send(loop.id, "[[fail]]"))

    assert names(events) == ["started", "error"] and events[-1].data.code == "agent_failed"


async def test_a_message_to_a_busy_loop_is_queued(alice: LoopClient) -> None:
    loop = await alice.create_loop()
    async with contextlib.aclosing(alice.send(loop.id, "[[slow: 1]]")) as running:
        started = await anext(running)
        queued = await collect(alice.send(loop.id, "after"))
        rest = await collect(running)

    assert started.event == "started" and names(rest)[-1] == "done"
    assert names(queued)[:2] == ["queued", "started"]
    assert queued[0].data.model_dump() == {"position": 1}
    assert text_of(queued) == "Echo #2: after"


async def test_the_stream_arrives_while_the_turn_runs(alice: LoopClient) -> None:
    loop = await alice.create_loop()
    seen: list[tuple[str, bool]] = []
    async for event in alice.send(loop.id, "[[slow: 2]]"):
        if event.event in {"assistant_delta", "done"}:
            seen.append((event.event, (await alice.get_loop(loop.id)).busy))
    # A buffered response would deliver every event after the turn ended (busy false).
    assert seen[0] == ("assistant_delta", True)
    assert seen[-1][0] == "done" and len(seen) == 11


async def test_a_permission_choice_is_answered(alice: LoopClient) -> None:
    loop = await alice.create_loop()
    events: list[LoopEvent] = []
    async for event in alice.send(
        loop.id, "[[bash: echo hi > f.txt && cat f.txt]]", permission_mode="default"
    ):
        events.append(event)
        if event.event == "requires_choice":
            await alice.answer_choice(loop.id, event.data.choice_id, allow=True, source="tests")

    choice = next(e for e in events if e.event == "requires_choice")
    resolved = next(e for e in events if e.event == "choice_resolved")
    assert choice.data.kind == "permission" and choice.data.payload.tool == "Bash"
    assert resolved.data.model_dump() == {"choice_id": choice.data.choice_id, "source": "tests"}
    assert next(e for e in events if e.event == "tool_result").data.ok is True
    assert names(events)[-1] == "done" and text_of(events) == "Tool ok: hi"


async def test_interrupt_ends_the_turn(alice: LoopClient) -> None:
    loop = await alice.create_loop()
    events: list[LoopEvent] = []
    async for event in alice.send(loop.id, "[[slow: 3]]"):
        events.append(event)
        if event.event == "assistant_delta" and len(events) == 2:
            await alice.interrupt(loop.id)
    await alice.interrupt(loop.id)

    assert names(events)[-1] == "interrupted"


async def test_history_pages_oldest_first(alice: LoopClient) -> None:
    loop = await alice.create_loop()
    for content in ("one", "two"):
        await collect(alice.send(loop.id, content))
    first = await alice.history(loop.id, limit=1)
    second = await alice.history(loop.id, limit=1, after=first.last_id)

    assert [item.user_text for item in first.data + second.data] == ["one", "two"]
    assert first.has_more and not second.has_more
    assert (first.data[0].assistant_text, first.data[0].ended) == ("Echo #1: one", "done")


# ---- watching ----------------------------------------------------------------------------


async def test_watch_resumes_from_an_event_id_without_gap_or_duplicate(alice: LoopClient) -> None:
    loop = await alice.create_loop()
    sending = asyncio.create_task(collect(alice.send(loop.id, "[[slow: 1]]")))
    first_part = await collect(alice.watch(loop.id, last_event_id=0), 3)
    rest = await collect(alice.watch(loop.id, last_event_id=first_part[-1].id))

    assert first_part + rest == await sending


# ---- reconnection ------------------------------------------------------------------------


class _CutStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, after: int) -> None:
        self._inner = inner
        self._after = after

    async def __aiter__(self) -> AsyncIterator[bytes]:
        # The server may send several events in one chunk: cut between events.
        count = 0
        pending = b""
        async for chunk in self._inner:
            pending += chunk
            *frames, pending = pending.split(b"\r\n\r\n")
            for frame in frames:
                if count == self._after:
                    raise httpx.ReadError("connection cut")
                count += 1
                yield frame + b"\r\n\r\n"

    async def aclose(self) -> None:
        await self._inner.aclose()


class CuttingTransport(httpx.AsyncBaseTransport):
    """A dropped connection: the first event stream of `method` breaks after `after` frames."""

    def __init__(self, inner: httpx.AsyncBaseTransport, method: str, after: int) -> None:
        self.inner = inner
        self.method = method
        self.after = after
        self.cut = False
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        response = await self.inner.handle_async_request(request)
        streams = response.headers["content-type"].startswith("text/event-stream")
        if self.cut or request.method != self.method or not streams:
            return response
        self.cut = True
        stream = _CutStream(cast(httpx.AsyncByteStream, response.stream), self.after)
        return httpx.Response(response.status_code, headers=response.headers, stream=stream)


def cutting_client(
    app: FastAPI, token: str, method: str, after: int
) -> tuple[LoopClient, CuttingTransport]:
    transport = CuttingTransport(StreamingASGITransport(app), method, after)
    client = LoopClient(IN_PROCESS_URL, token, transport=transport, reconnect=FAST_RECONNECT)
    return client, transport


async def test_send_reconnects_after_a_cut_with_the_same_key(
    app: FastAPI, tokens: dict[str, str]
) -> None:
    client, transport = cutting_client(app, tokens["alice"], "POST", after=3)
    async with client:
        loop = await client.create_loop()
        events = await collect(client.send(loop.id, "[[slow: 1]]"))
        logged = await collect(client.watch(loop.id, last_event_id=0))
    posts = [
        r for r in transport.requests if r.method == "POST" and r.url.path.endswith("messages")
    ]

    assert len(posts) == 2
    assert posts[0].headers["idempotency-key"] == posts[1].headers["idempotency-key"]
    assert events == logged and names(events)[-1] == "done"
    assert len(events) == 12


async def test_watch_reconnects_after_a_cut_with_last_event_id(
    app: FastAPI, tokens: dict[str, str]
) -> None:
    client, transport = cutting_client(app, tokens["alice"], "GET", after=2)
    async with client:
        loop = await client.create_loop()
        sent = await collect(client.send(loop.id, "hello"))
        watched = await collect(client.watch(loop.id, last_event_id=0))
    resume = [r.headers.get("last-event-id") for r in transport.requests if r.method == "GET"]

    assert watched == sent
    assert resume == ["0", str(sent[1].id)]


async def test_a_send_without_key_is_not_retried(app: FastAPI, tokens: dict[str, str]) -> None:
    client, transport = cutting_client(app, tokens["alice"], "POST", after=1)
    async with client:
        loop = await client.create_loop()
        with pytest.raises(httpx.ReadError):
            await collect(client.send(loop.id, "hello", idempotency_key=None))
    assert "idempotency-key" not in transport.requests[-1].headers


# ---- accounts ----------------------------------------------------------------------------


async def test_login_manages_tokens_and_logout_ends_the_session(
    connect: Connect, tokens: dict[str, str]
) -> None:
    async with connect() as person, connect(tokens["alice"]) as bot:
        with pytest.raises(LoopApiError) as wrong:
            await person.login("alice", "wrong")
        await person.login("alice", PASSWORD)
        created = await person.create_token("slack bot")
        listed = await person.list_tokens()
        async with connect(created.token) as minted:
            await minted.list_loops()
            await person.revoke_token(created.tokenId)
            with pytest.raises(LoopApiError) as revoked:
                await minted.list_loops()
        with pytest.raises(LoopApiError) as gone:
            await person.revoke_token(created.tokenId)
        with pytest.raises(LoopApiError) as bearer_refused:
            await bot.create_token("more")
        await person.logout()
        with pytest.raises(LoopApiError) as logged_out:
            await person.list_tokens()

    assert wrong.value.status == 401
    assert created.token.startswith("la_") and len(created.token) == 51
    assert created.tokenId in {t.tokenId for t in listed.tokens}
    assert revoked.value.code == "invalid_token"
    assert (gone.value.status, gone.value.code) == (404, "token_not_found")
    assert bearer_refused.value.status == logged_out.value.status == 401


# ---- the transport itself ----------------------------------------------------------------


async def test_the_transport_streams_bodies_both_ways_and_reports_disconnect() -> None:
    seen: list[str] = []

    async def echo_until_left(scope: Any, receive: Receive, send: Send) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message["body"], message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body, "more_body": True})
        left: Message = await receive()
        seen.append(left["type"])

    async def chunks() -> AsyncIterator[bytes]:
        yield b"hello "
        yield b"world"

    transport = StreamingASGITransport(echo_until_left)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://app") as http,
        http.stream("POST", "/", content=chunks()) as response,
    ):
        first = await anext(response.aiter_bytes())
    assert first == b"hello world"
    assert seen == ["http.disconnect"]


async def test_an_app_that_fails_before_answering_is_a_protocol_error() -> None:
    async def broken(scope: Any, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    transport = StreamingASGITransport(broken)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        with pytest.raises(httpx.RemoteProtocolError) as caught:
            await http.get("/")
    assert isinstance(caught.value.__cause__, RuntimeError)
