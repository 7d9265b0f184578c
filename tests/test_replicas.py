"""[ext] Several replicas: three real `loopbridge serve` processes on one PostgreSQL database
and one data directory, the real agent CLI against the stand-in model.

The replicas start once for the module; the last test kills one of them."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from bridge.client import LoopClient
from bridge.contract.models import Author
from bridge.server.net import listen
from bridge.standin import StandinModel
from tests.polling import until
from tests.postgres import Postgres, unavailable
from tests.replicas import Cluster, processes_in
from tests.sse import TERMINAL, Ev, events, names, text_of, turn

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")

# What the contract promises: a dead replica's turns end within this, on every stream.
FAILOVER_SECONDS = 15.0
SLOW_TEXT = "".join(f"slow {n}/10. " for n in range(1, 11))  # the stand-in's [[slow]]


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def cluster(standin: StandinModel) -> AsyncIterator[Cluster]:
    # Not under pytest's tmp dir: that is private to root, and PostgreSQL runs as postgres.
    pg_root = Path(tempfile.mkdtemp(prefix="loopbridge-pg-"))
    root = Path(tempfile.mkdtemp(prefix="loopbridge-replicas-"))
    server = Postgres(pg_root)
    running = Cluster(root / "home", server.start())
    try:
        await running.create_token()
        await running.start("a", "b", "c")  # at once, on a database with no schema yet
        yield running
    finally:
        await running.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(pg_root, ignore_errors=True)


async def new_loop(http: httpx.AsyncClient, **body: object) -> str:
    r = await http.post("/loops", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def watch_until(
    http: httpx.AsyncClient,
    loop: str,
    ends: int = 1,
    headers: dict[str, str] | None = None,
    opened: asyncio.Event | None = None,
) -> list[Ev]:
    """A watcher's events (pings left out) through the `ends`-th terminal event."""
    seen: list[Ev] = []

    async def read() -> None:
        async with httpx.AsyncClient(
            base_url=http.base_url, headers=http.headers, timeout=60
        ) as own:
            async for ev in events(own, "GET", f"/loops/{loop}/events", headers=headers or {}):
                if ev.name == "ping":
                    continue
                seen.append(ev)
                if sum(e.name in TERMINAL for e in seen) == ends:
                    return

    task = asyncio.create_task(read())
    if opened is not None:
        opened.set()
    await task
    return seen


def same(evs: list[Ev]) -> list[tuple[int | None, str, dict[str, object]]]:
    return [(e.id, e.name, e.data) for e in evs]


async def first_events(
    http: httpx.AsyncClient, loop: str, content: str, count: int, **body: object
) -> tuple[list[Ev], AsyncGenerator[Ev, None]]:
    """Send a message and read its first `count` events; the rest of the stream to go on."""
    stream = events(http, "POST", f"/loops/{loop}/messages", json={"content": content, **body})
    seen = [ev async for ev in _take(stream, count)]
    return seen, stream


async def _take(stream: AsyncIterator[Ev], count: int) -> AsyncIterator[Ev]:
    taken = 0
    async for ev in stream:
        if ev.name == "ping":
            continue
        yield ev
        taken += 1
        if taken == count:
            return


async def choice_of(stream: AsyncIterator[Ev]) -> str:
    async for ev in stream:
        if ev.name == "requires_choice":
            return str(ev.data["choice_id"])
        assert ev.name not in TERMINAL, ev
    raise AssertionError("the stream ended without a choice")


async def rest_of(stream: AsyncGenerator[Ev, None]) -> list[Ev]:
    """The stream's events through its terminal one; then the stream is closed."""
    seen = []
    async with contextlib.aclosing(stream):
        async for ev in stream:
            if ev.name == "ping":
                continue
            seen.append(ev)
            if ev.name in TERMINAL:
                break
    return seen


# ---- fan-out and forwarding ---------------------------------------------------------------


async def test_create_on_a_send_on_b_watch_on_c(cluster: Cluster) -> None:
    a, b, c = cluster["a"], cluster["b"], cluster["c"]
    loop = await new_loop(a.http, title="three replicas")
    # From the start of the log (id 0), so the watcher sees the whole turn however late
    # it connects.
    watcher = asyncio.create_task(watch_until(c.http, loop, headers={"Last-Event-ID": "0"}))
    sent = await turn(b.http, loop, "hello")
    watched = await asyncio.wait_for(watcher, 30)
    assert names(sent)[-1] == "done" and text_of(sent) == "Echo #1: hello"
    assert same(watched) == same(sent)
    # A second turn through the third replica numbers on from the first.
    again = await turn(c.http, loop, "again")
    assert text_of(again) == "Echo #2: again"
    assert again[0].id is not None and sent[-1].id is not None and again[0].id > sent[-1].id
    for replica in (a, b, c):
        detail = (await replica.http.get(f"/loops/{loop}")).json()
        assert detail["turn_count"] == 2 and detail["busy"] is False
        history = (await replica.http.get(f"/loops/{loop}/messages")).json()["data"]
        assert [h["assistant_text"] for h in history] == ["Echo #1: hello", "Echo #2: again"]


async def test_resume_and_replay_through_another_replica(
    cluster: Cluster, standin: StandinModel
) -> None:
    a, b, c = cluster["a"], cluster["b"], cluster["c"]
    loop = await new_loop(a.http)
    key = {"Idempotency-Key": "replicas-replay"}
    before = len(standin.main_requests())
    sent = await turn(a.http, loop, "once", headers=key)
    assert text_of(sent) == "Echo #1: once"
    assert len(standin.main_requests()) == before + 1
    replayed = await turn(c.http, loop, "once", headers=key)
    assert same(replayed) == same(sent)
    assert len(standin.main_requests()) == before + 1, "the model was called again"
    # Resume on a replica that does not run the loop, from an id the owner's stream gave.
    resume = {"Last-Event-ID": str(sent[1].id)}
    resumed = await watch_until(b.http, loop, headers=resume)
    assert same(resumed) == same(sent[2:])
    r = await b.http.get(f"/loops/{loop}/events", headers={"Last-Event-ID": "99999999"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_last_event_id"


async def test_two_sends_at_once_through_two_replicas_queue(
    cluster: Cluster, standin: StandinModel
) -> None:
    a, b = cluster["a"], cluster["b"]
    loop = await new_loop(a.http)
    before = len(standin.main_requests())
    first, second = await asyncio.gather(
        turn(a.http, loop, "[[slow: 1]] first"), turn(b.http, loop, "second")
    )
    for evs in (first, second):
        assert names(evs)[-1] == "done", names(evs)
    assert "queued" in names(first) + names(second)
    assert len(standin.main_requests()) == before + 2
    history = (await b.http.get(f"/loops/{loop}/messages")).json()["data"]
    assert sorted(h["user_text"] for h in history) == ["[[slow: 1]] first", "second"]
    assert [h["ended"] for h in history] == ["done", "done"]


async def test_choice_and_interrupt_through_a_non_owner(cluster: Cluster) -> None:
    a, b, c = cluster["a"], cluster["b"], cluster["c"]
    loop = await new_loop(a.http)
    start, stream = await first_events(a.http, loop, "[[bash: echo ok > allowed.txt]]", 1)
    assert names(start) == ["started"]
    choice = await choice_of(stream)
    r = await b.http.post(f"/loops/{loop}/choices/{choice}", json={"allow": True})
    assert r.status_code == 202, r.text
    rest = await rest_of(stream)
    assert "choice_resolved" in names(rest) and names(rest)[-1] == "done"
    r = await c.http.post(f"/loops/{loop}/choices/{choice}", json={"allow": True})
    assert r.status_code == 404 and r.json()["error"]["code"] == "choice_not_found"

    # An interrupt through another replica ends the owner's running turn.
    start, stream = await first_events(a.http, loop, "[[slow: 30]]", 2)
    assert names(start) == ["started", "assistant_delta"]
    # A watcher elsewhere that attaches mid-turn starts with a snapshot of what the log
    # holds by then (or, when the log has not got the turn's start yet, with `started`),
    # and its deltas go on from there with no gap.
    watch = events(b.http, "GET", f"/loops/{loop}/events")
    async with contextlib.aclosing(watch):
        first, *more = [ev async for ev in _take(watch, 3)]
    assert first.name in ("snapshot", "started") and names(more) == ["assistant_delta"] * 2
    assert first.data["turn_id"] == start[0].data["turn_id"]
    so_far = first.data.get("assistant_text_so_far", "") + text_of(more)
    assert SLOW_TEXT.startswith(so_far) and so_far.count("slow") >= 2, so_far
    r = await c.http.post(f"/loops/{loop}/interrupt")
    assert r.status_code == 202
    rest = await asyncio.wait_for(rest_of(stream), 20)
    assert names(rest)[-1] == "interrupted"


async def test_archive_through_a_non_owner_stops_the_agent(cluster: Cluster) -> None:
    a, b, c = cluster["a"], cluster["b"], cluster["c"]
    loop = await new_loop(a.http)
    assert names(await turn(a.http, loop, "hello"))[-1] == "done"
    workdir = cluster.home.resolve() / "loops" / loop
    assert processes_in(workdir), "no agent runs for the loop"
    r = await b.http.delete(f"/loops/{loop}")
    assert r.status_code == 204
    await until(lambda: not processes_in(workdir), 20, "the agent to stop")
    assert (await c.http.get(f"/loops/{loop}")).json()["archived"] is True
    r = await c.http.post(f"/loops/{loop}/messages", json={"content": "more"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "loop_archived"


async def test_forwarded_header_from_outside_means_nothing(cluster: Cluster) -> None:
    a, b = cluster["a"], cluster["b"]
    loop = await new_loop(a.http)
    assert names(await turn(a.http, loop, "[[slow: 2]]hold"))[-1] == "done"  # a owns it
    forged = {"X-Loopbridge-Forwarded": "0" * 64}
    sent = await turn(b.http, loop, "still one owner", headers=forged)
    assert text_of(sent) == "Echo #2: still one owner"


async def test_a_fenced_out_owner_steps_down_mid_turn(cluster: Cluster) -> None:
    a, b = cluster["a"], cluster["b"]
    loop = await new_loop(a.http)
    assert names(await turn(a.http, loop, "one"))[-1] == "done"  # a owns the loop
    start, stream = await first_events(a.http, loop, "[[slow: 20]]", 2)
    assert names(start) == ["started", "assistant_delta"]
    workdir = cluster.home.resolve() / "loops" / loop
    assert processes_in(workdir), "no agent runs for the loop"
    import asyncpg  # the postgres extra's (the module skips without it)

    # Another replica (one that no longer answers) took the loop over: a new epoch.
    conn = await asyncpg.connect(cluster.database_url.replace("+asyncpg", ""))
    try:
        moved = await conn.execute(
            "UPDATE loop_leases SET replica_id = 'gone', internal_url = 'http://127.0.0.1:9',"
            " epoch = epoch + 1 WHERE loop_id = $1",
            loop,
        )
        assert moved == "UPDATE 1"
    finally:
        await conn.close()
    await until(lambda: not processes_in(workdir), 20, "the fenced-out owner to stop its agent")
    # a's own stream ends at once (its error is a's own, not in the log).
    ended = await asyncio.wait_for(rest_of(stream), 10)
    assert ended[-1].name == "error" and ended[-1].data["code"] == "agent_failed"
    # The log has nothing more of a's: the turn's deltas so far, then the error with which
    # the turn ends once the unanswering owner's lease expires.
    logged = await asyncio.wait_for(
        watch_until(b.http, loop, headers={"Last-Event-ID": str(start[0].id)}), 20
    )
    assert names(logged)[-1] == "error" and logged[-1].data["code"] == "agent_failed"
    assert set(names(logged)[:-1]) <= {"assistant_delta"}
    assert SLOW_TEXT.startswith(text_of(start) + text_of(logged[1:]))
    await asyncio.sleep(3)  # what must NOT happen meanwhile: more rows of the turn
    conn = await asyncpg.connect(cluster.database_url.replace("+asyncpg", ""))
    try:
        rows = await conn.fetch(
            "SELECT seq, name FROM events WHERE turn_id = $1 ORDER BY seq", start[0].data["turn_id"]
        )
    finally:
        await conn.close()
    assert rows[-1]["name"] == "error" and rows[-1]["seq"] == logged[-1].id, "written after"
    # The next message runs on a live replica, in the same conversation.
    after = await asyncio.wait_for(turn(b.http, loop, "three"), 60)
    assert names(after)[-1] == "done" and not text_of(after).startswith("Echo #1:")


# ---- behind a load balancer ------------------------------------------------------------------

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
HAPROXY_CONFIG = """
global
    maxconn 512
defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    # Every request is balanced on its own: no stickiness of any kind.
    option http-server-close
frontend api
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
{servers}
"""


@pytest.fixture
def haproxy_port() -> int:
    probe = listen("127.0.0.1", 0)
    port = int(probe.getsockname()[1])
    probe.close()
    return port


@pytest.mark.skipif(not Path(HAPROXY).is_file(), reason="haproxy is not installed")
async def test_a_slack_style_session_through_haproxy_round_robin(
    cluster: Cluster, haproxy_port: int
) -> None:
    servers = "\n".join(
        f"    server {name} {cluster[name].url.removeprefix('http://')}" for name in ("a", "b")
    )
    config = cluster.home.parent / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(port=haproxy_port, servers=servers))
    proxy = await asyncio.create_subprocess_exec(
        HAPROXY, "-f", str(config), "-db",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{haproxy_port}"
    try:
        await wait_serving(base)
        before = {name: await requests_served(cluster[name].url) for name in ("a", "b")}
        async with LoopClient(base, cluster.token) as bot:
            thread = {"slack_thread": "C123:1716.000100"}
            loop = await bot.create_loop(title="a Slack thread", metadata=thread)
            found = await bot.find_loop(thread)
            assert found is not None and found.id == loop.id
            watched: list[str] = []

            async def watch() -> None:
                async for event in bot.watch(loop.id, last_event_id=0):
                    watched.append(event.event)

            watcher = asyncio.create_task(watch())
            try:
                author = Author(id="slack:U1", name="Alice")
                first = [e async for e in bot.send(loop.id, "hello", author=author)]
                assert first[-1].event == "done"
                # A question, answered by a click that lands on whichever replica.
                asked = bot.send(loop.id, "[[ask]]", author=author)
                async for event in asked:
                    if event.event == "requires_choice":
                        await bot.answer_choice(
                            loop.id, event.data.choice_id, answers={"q1": "Blue"}
                        )
                    last = event
                assert last.event == "done"
                # A permission, allowed the same way.
                asked = bot.send(loop.id, "[[bash: echo ok > haproxy.txt]]", author=author)
                async for event in asked:
                    if event.event == "requires_choice":
                        await bot.answer_choice(loop.id, event.data.choice_id, allow=True)
                    last = event
                assert last.event == "done"
                await until(lambda: watched.count("done") == 3, 30, "the watcher's three turns")
            finally:
                watcher.cancel()
            history = (await bot.history(loop.id)).data
            assert [h.ended for h in history] == ["done", "done", "done"]
            assert "Blue" in history[1].assistant_text
            assert (cluster.home / "loops" / loop.id / "work" / "haproxy.txt").read_text() == "ok\n"
            assert [c.answer for c in history[2].choices] == [{"allow": True}]
        for name in ("a", "b"):  # both replicas took part
            assert await requests_served(cluster[name].url) > before[name], name
    finally:
        proxy.terminate()
        await proxy.wait()


async def wait_serving(base: str) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=5) as http:
        for _ in range(100):
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get("/healthz")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise AssertionError("haproxy does not serve")


async def requests_served(url: str) -> float:
    """The replica's count of loop API requests answered, from its own /metrics."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        text = (await http.get("/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("loopbridge_http_requests_total{") and "/api/v1/loops" in line
    )


# ---- failover (kills a replica: keep last) -------------------------------------------------


async def test_kill_9_of_the_owner_mid_turn(cluster: Cluster) -> None:
    a, b, c = cluster["a"], cluster["b"], cluster["c"]
    loop = await new_loop(a.http)
    assert text_of(await turn(a.http, loop, "one")) == "Echo #1: one"  # a owns the loop
    opened = asyncio.Event()
    watcher = asyncio.create_task(watch_until(b.http, loop, opened=opened))
    await opened.wait()
    # Sent through c, run on a: c relays a's stream.
    start, stream = await first_events(c.http, loop, "[[slow: 60]]", 2)
    assert names(start) == ["started", "assistant_delta"]
    await cluster.kill("a")
    killed = time.monotonic()
    relayed = await asyncio.wait_for(rest_of(stream), FAILOVER_SECONDS + 5)
    watched = await asyncio.wait_for(watcher, FAILOVER_SECONDS + 5)
    took = time.monotonic() - killed
    assert took < FAILOVER_SECONDS, f"the error came {took:.1f} s after the kill"
    for evs in (relayed, watched):
        assert evs[-1].name == "error" and evs[-1].data["code"] == "agent_failed", names(evs)
    assert relayed[-1].id == watched[-1].id
    # The next message runs on a survivor, in the same conversation.
    after = await asyncio.wait_for(turn(b.http, loop, "three"), 60)
    assert names(after)[-1] == "done", after
    assert text_of(after).startswith("Echo #") and not text_of(after).startswith("Echo #1:")
    history = (await c.http.get(f"/loops/{loop}/messages")).json()["data"]
    assert [h["ended"] for h in history] == ["done", "error", "done"]
