"""The event log never wedges: a failing database is retried and reported, never waited on
forever; a refused row costs only its own loop's rows; background failures are logged."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from core.storage import FLUSH_TIMEOUT_SECONDS, Database, EventLogUnavailable, EventWriter
from core.tasks import spawn
from tests.conftest import start_server, stop_server
from tests.sse import events, text_of, turn


def _sql(db_file: Path, statement: str) -> None:
    """A statement from another connection, as an operator or another program would."""
    with sqlite3.connect(db_file, timeout=10, isolation_level=None) as conn:
        conn.execute(statement)


async def sql(db_file: Path, statement: str) -> None:
    await asyncio.to_thread(_sql, db_file, statement)


def logged_ids(db_file: Path, loop: str) -> list[int]:
    with sqlite3.connect(db_file) as conn:
        rows = conn.execute("SELECT seq FROM events WHERE loop_id = ? ORDER BY seq", (loop,))
        return [seq for (seq,) in rows]


@pytest.fixture
async def writer(tmp_path):
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}")
    await db.migrate()
    writer = EventWriter(db)
    writer.start()
    yield writer, tmp_path / "log.db"
    await writer.close()
    await db.close()


def row(writer: EventWriter, loop: str, seq: int) -> None:
    writer.append(loop, seq, "turn_x", "assistant_delta", f'{{"text":"{seq}"}}')


async def test_a_conflicting_row_costs_only_its_loops_rows(writer, caplog):
    writer, db_file = writer
    await sql(db_file, "INSERT INTO events VALUES ('loop_a', 2, 'turn_x', 'tool_call', '{}')")
    for seq in (1, 2, 3):  # one batch: loop_a's id 2 is taken, loop_b's rows are fine
        row(writer, "loop_a", seq)
        row(writer, "loop_b", seq)
    async with asyncio.timeout(5):
        await writer.flush()
    assert logged_ids(db_file, "loop_b") == [1, 2, 3]
    assert logged_ids(db_file, "loop_a") == [2]  # only the row that was there
    assert "loop loop_a: 3 events (ids 1–3) are not in the event log" in caplog.text
    assert writer.problem is None
    row(writer, "loop_a", 4)  # the writer goes on, for that loop too
    await writer.flush()
    assert logged_ids(db_file, "loop_a") == [2, 4]


async def test_flush_raises_while_the_database_fails_and_nothing_is_lost(writer, caplog):
    writer, db_file = writer
    row(writer, "loop_a", 1)
    await writer.flush()
    await sql(db_file, "ALTER TABLE events RENAME TO events_away")
    row(writer, "loop_a", 2)
    started = time.monotonic()
    with pytest.raises(EventLogUnavailable, match="no such table: events"):
        await writer.flush()
    assert time.monotonic() - started < FLUSH_TIMEOUT_SECONDS
    assert "event log write failed" in caplog.text
    assert "no such table" in (writer.problem or "")
    with pytest.raises(EventLogUnavailable):  # again, and again without waiting long
        async with asyncio.timeout(FLUSH_TIMEOUT_SECONDS + 1):
            await writer.flush()

    await sql(db_file, "ALTER TABLE events_away RENAME TO events")
    row(writer, "loop_a", 3)
    async with asyncio.timeout(10):
        await writer.flush()
    assert writer.problem is None
    assert logged_ids(db_file, "loop_a") == [1, 2, 3]


async def test_a_failing_background_task_is_logged_with_its_name(caplog):
    async def fails() -> None:
        raise RuntimeError("boom")

    task = spawn(fails(), "loop x: save something")
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)  # done callbacks run on the next pass of the event loop
    assert "background task loop x: save something failed" in caplog.text
    assert "RuntimeError: boom" in caplog.text


async def test_readyz_reports_the_event_log_and_readers_get_an_answer(standin, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    server = await start_server(tmp_path)
    db_file = tmp_path / "loopbridge.db"
    try:
        root = httpx.AsyncClient(base_url=server.url, timeout=30)  # no credentials
        assert (await root.get("/readyz")).json() == {"status": "ok"}
        loop = (await server.http.post("/loops", json={})).json()["id"]
        first = await turn(server.http, loop, "one")

        await sql(db_file, "ALTER TABLE events RENAME TO events_away")
        second = await turn(server.http, loop, "two")  # live delivery does not wait on the log
        assert text_of(second) == "Echo #2: two"

        async def not_ready() -> httpx.Response | None:
            resp = await root.get("/readyz")
            return resp if resp.status_code == 503 else None

        resp = await until_async(not_ready, what="/readyz 503")
        body = resp.json()["error"]
        assert body["code"] == "not_ready" and "no such table: events" in body["message"]
        assert "event log write failed" in caplog.text

        started = time.monotonic()
        resume = await server.http.get(
            f"/loops/{loop}/events", headers={"Last-Event-ID": str(first[0].id)}
        )
        assert resume.status_code == 503, resume.text
        assert resume.json()["error"]["code"] == "not_ready"
        assert time.monotonic() - started < FLUSH_TIMEOUT_SECONDS + 2

        await sql(db_file, "ALTER TABLE events_away RENAME TO events")

        async def ready() -> bool:
            return (await root.get("/readyz")).status_code == 200

        await until_async(ready, what="/readyz 200 again")
        seen = []
        async for ev in events(
            server.http, "GET", f"/loops/{loop}/events", headers={"Last-Event-ID": "0"}
        ):
            seen.append(ev)
            if ev.id == second[-1].id:
                break
        expected = first + second
        assert [(e.id, e.name, e.data) for e in seen] == [(e.id, e.name, e.data) for e in expected]
        await root.aclose()
    finally:
        await stop_server(server)


async def until_async(check, within: float = 30.0, what: str = ""):
    """Like `tests.polling.until`, for a check that is awaited."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)
