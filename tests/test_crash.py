"""A server killed mid-turn (SIGKILL) reuses no event id: a watcher resumes from any id it
saw live, with no gap, and the crashed turn's history keeps the text its log holds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from httpx_sse import aconnect_sse

from tests.sse import Ev, events, text_of, turn

LOOPBRIDGE = Path(sys.executable).parent / "loopbridge"
SERVING = re.compile(r"serving the Loop API on (http://\S+)/api/v1")


def _env(home: Path) -> dict[str, str]:
    # The stand-in's address and the agents' settings come from the `standin` fixture.
    return {**os.environ, "LOOPBRIDGE_HOME": str(home), "LOOPBRIDGE_SANDBOX": "local"}


async def _token(home: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        LOOPBRIDGE, "tokens", "create", "--user", "alice",
        env=_env(home), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    return out.decode().strip().splitlines()[-1]


@contextlib.asynccontextmanager
async def serving(home: Path) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """`loopbridge serve` in its own process: its URL and the process."""
    proc = await asyncio.create_subprocess_exec(
        LOOPBRIDGE, "serve", "--port", "0", env=_env(home), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            while not (found := SERVING.search((await proc.stdout.readline()).decode())):
                assert proc.returncode is None, "loopbridge serve ended before it served"
        yield found.group(1), proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(20):
                    await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def client(url: str, token: str) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.AsyncClient(base_url=url + "/api/v1", headers=headers, timeout=60)


async def test_a_killed_server_reuses_no_event_id(standin, tmp_path):
    token = await _token(tmp_path)
    live: list[Ev] = []
    opened, seen_enough = asyncio.Event(), asyncio.Event()

    async def watch(http: httpx.AsyncClient, loop: str) -> None:
        with contextlib.suppress(httpx.HTTPError):
            async with aconnect_sse(http, "GET", f"/loops/{loop}/events") as source:
                assert source.response.status_code == 200
                opened.set()  # the server subscribed the watcher before it answered
                async for sse in source.aiter_sse():
                    live.append(Ev(sse.event, json.loads(sse.data), int(sse.id or 0) or None))
                    if sum(e.name == "assistant_delta" for e in live) >= 300:
                        seen_enough.set()

    async def send(http: httpx.AsyncClient, loop: str) -> None:
        with contextlib.suppress(httpx.HTTPError):
            await turn(http, loop, "[[stamped: 3000]]")

    async with serving(tmp_path) as (url, proc):
        http = client(url, token)
        loop = (await http.post("/loops", json={})).json()["id"]
        before = await turn(http, loop, "before")
        tasks = [asyncio.create_task(watch(http, loop))]
        async with asyncio.timeout(30):
            await opened.wait()
        tasks.append(asyncio.create_task(send(http, loop)))
        async with asyncio.timeout(60):
            await seen_enough.wait()
        proc.send_signal(signal.SIGKILL)  # events seen a moment ago are not on disk yet
        await proc.wait()
        await asyncio.gather(*tasks)
        await http.aclose()
    highest = max(e.id for e in live if e.id is not None)
    crashed = next(e.data["turn_id"] for e in live if e.name == "started")

    async with serving(tmp_path) as (url, _):
        http = client(url, token)
        resumed: list[Ev] = []
        after_done = asyncio.Event()

        async def resume() -> None:
            headers = {"Last-Event-ID": str(highest)}
            async for ev in events(http, "GET", f"/loops/{loop}/events", headers=headers):
                resumed.append(ev)
                if ev.name == "done":
                    after_done.set()
                    return

        watcher = asyncio.create_task(resume())
        while not resumed:  # the crashed turn's end comes from the log first
            await asyncio.sleep(0.02)
            if watcher.done():
                await watcher  # raises the refusal (before the fix: 400 "ahead")
        after = await turn(http, loop, "after")
        async with asyncio.timeout(30):
            await after_done.wait()

        assert resumed[0].name == "error" and resumed[0].data["turn_id"] == crashed
        assert resumed[0].id > highest, "the crashed turn's end reuses an id seen live"
        assert after[0].id > resumed[0].id
        ids = [e.id for e in resumed if e.name != "ping"]
        assert ids == sorted(set(ids))
        assert [(e.id, e.name, e.data) for e in resumed[1:]] == [
            (e.id, e.name, e.data) for e in after
        ], "the resumed watcher missed or repeated events of the next turn"

        logged: list[Ev] = []
        async for ev in events(
            http, "GET", f"/loops/{loop}/events", headers={"Last-Event-ID": "0"}
        ):
            logged.append(ev)
            if ev.id == after[-1].id:
                break
        logged_ids = [e.id for e in logged]
        assert logged_ids == sorted(set(logged_ids)), "an id is in the log twice"
        crashed_logged = [e for e in logged if before[-1].id < e.id < resumed[0].id]
        history = (await http.get(f"/loops/{loop}/messages")).json()["data"]
        item = next(h for h in history if h["turn_id"] == crashed)
        assert item["ended"] == "error" and item["error"]["code"] == "agent_failed"
        assert item["assistant_text"] == text_of(crashed_logged) != ""
        assert text_of(live).startswith(item["assistant_text"])
        assert text_of(after) == "Echo #3: after"
        await http.aclose()
