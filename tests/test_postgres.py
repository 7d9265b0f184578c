"""The same engine on PostgreSQL: turns, restart, metadata filters, replay."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import pytest_asyncio

from tests.conftest import start_server, stop_server
from tests.postgres import Postgres, unavailable
from tests.sse import text_of, turn

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def database_url():
    # Not under pytest's tmp dir: that is private to root, and PostgreSQL runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="loopbridge-pg-"))
    server = Postgres(root)
    url = server.start()
    yield url
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


async def test_turns_survive_a_restart_on_postgres(standin, database_url, tmp_path):
    first = await start_server(tmp_path, database_url=database_url)
    token = first.token
    body = {"title": "pg", "metadata": {"thread": "T-1", "n": "1"}}
    loop = (await first.http.post("/loops", json=body)).json()["id"]
    key = {"Idempotency-Key": "pg-key"}
    before = await turn(first.http, loop, "one", headers=key)
    assert text_of(before) == "Echo #1: one"
    await stop_server(first)

    server = await start_server(tmp_path, database_url=database_url)
    try:
        http = server.client(token)
        found = (await http.get("/loops", params={"metadata.thread": "T-1"})).json()["data"]
        assert [item["id"] for item in found] == [loop]
        assert (await http.get("/loops", params={"metadata.thread": "T-2"})).json()["data"] == []
        assert text_of(await turn(http, loop, "two")) == "Echo #2: two"
        replay = await turn(http, loop, "one", headers=key)
        assert [(e.id, e.name, e.data) for e in replay] == [(e.id, e.name, e.data) for e in before]
        history = (await http.get(f"/loops/{loop}/messages")).json()["data"]
        assert [h["assistant_text"] for h in history] == ["Echo #1: one", "Echo #2: two"]
        await http.aclose()
    finally:
        await stop_server(server)
