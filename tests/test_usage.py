"""Usage per turn, loop totals, GET /usage, budgets, /metrics and JSON logs, through HTTP
with the real agent CLI against the stand-in (which reports the token counts set here)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from bridge.server.logs import setup_logging
from tests.conftest import Server, start_server, stop_server
from tests.polling import until
from tests.sse import events, names, turn

# What the stand-in reports for every model call in these tests.
TOKENS = {
    "input_tokens": 1000,
    "output_tokens": 100,
    "cache_creation_input_tokens": 2000,
    "cache_read_input_tokens": 5000,
}
# The CLI's list prices (US dollars per token) of the model it asks for by default
# (claude-opus-5-5), as measured: input 4, output 20, cache write 5, cache read 0.2 per
# million tokens (below its long-context tier).
PRICES = {
    "input_tokens": 4e-6,
    "output_tokens": 20e-6,
    "cache_creation_input_tokens": 5e-6,
    "cache_read_input_tokens": 0.2e-6,
}
CALL_COST = sum(TOKENS[kind] * PRICES[kind] for kind in TOKENS)  # $0.017
TOKEN_KINDS = tuple(TOKENS)


@contextlib.contextmanager
def reported(standin, tokens: dict[str, int] = TOKENS) -> Iterator[None]:
    standin.usage = tokens
    try:
        yield
    finally:
        standin.usage = None


async def new_loop(http) -> str:
    r = await http.post("/loops", json={})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def calls_usage(standin, since: int) -> dict[str, int]:
    """What the model reported for its conversation calls from index `since` on, summed."""
    calls = standin.main_usage()[since:]
    return {kind: sum(call[kind] for call in calls) for kind in TOKEN_KINDS}


def assert_usage(usage: dict, tokens: dict[str, int], calls: int) -> None:
    assert {kind: usage[kind] for kind in TOKEN_KINDS} == tokens
    assert usage["cost_usd"] == pytest.approx(calls * CALL_COST, abs=1e-9)
    assert isinstance(usage["duration_ms"], int) and usage["duration_ms"] > 0


# ---- usage per turn ----------------------------------------------------------------------


async def test_each_turn_reports_its_own_usage_not_the_sessions(server, standin) -> None:
    loop = await new_loop(server.http)
    bypass = {"permission_mode": "bypassPermissions"}  # the Bash turn's mode, from the start
    with reported(standin):
        seen = len(standin.main_usage())
        first = await turn(server.http, loop, "one", **bypass)
        assert first[-1].name == "done"
        assert_usage(first[-1].data["usage"], calls_usage(standin, seen), calls=1)
        assert first[-1].data["usage"]["input_tokens"] == TOKENS["input_tokens"]

        seen = len(standin.main_usage())
        second = await turn(server.http, loop, "two", **bypass)
        # The CLI's total_cost_usd is now twice the first: the turn's own is one call's.
        assert_usage(second[-1].data["usage"], calls_usage(standin, seen), calls=1)

        seen = len(standin.main_usage())
        tool = await turn(server.http, loop, "[[bash: true]]", **bypass)
        assert names(tool)[-1] == "done", tool[-1].data
        # A Bash round trip is two model calls; the turn's usage covers both.
        doubled = {kind: 2 * value for kind, value in TOKENS.items()}
        assert calls_usage(standin, seen) == doubled
        assert_usage(tool[-1].data["usage"], doubled, calls=2)

    history = (await server.http.get(f"/loops/{loop}/messages")).json()["data"]
    assert [item["usage"] for item in history] == [
        first[-1].data["usage"],
        second[-1].data["usage"],
        tool[-1].data["usage"],
    ]


async def test_a_cold_resumed_turn_reports_its_own_usage(standin, tmp_path) -> None:
    server = await start_server(tmp_path / "home", agent_idle_seconds=0.5)
    try:
        loop = await new_loop(server.http)
        with reported(standin):
            first = await turn(server.http, loop, "one")
            assert_usage(first[-1].data["usage"], TOKENS, calls=1)
            runtime = server.engine._runtimes[loop]
            await until(lambda: runtime.agent is None, what="the idle agent to stop")
            second = await turn(server.http, loop, "two")
        assert second[0].data["cold_start"] is True
        assert "two" in "".join(e.data.get("text", "") for e in second)
        # The resumed CLI carries the session's running total over; the turn is still its own.
        assert_usage(second[-1].data["usage"], TOKENS, calls=1)
    finally:
        await stop_server(server)


async def test_history_has_no_usage_while_running(server, standin) -> None:
    loop = await new_loop(server.http)
    stream = events(server.http, "POST", f"/loops/{loop}/messages", json={"content": "[[slow: 2]]"})
    async for ev in stream:
        if ev.name == "assistant_delta":
            break
    item = (await server.http.get(f"/loops/{loop}/messages")).json()["data"][0]
    assert item["ended"] == "running" and item["usage"] is None
    async for ev in stream:
        if ev.name == "done":
            break
    item = (await server.http.get(f"/loops/{loop}/messages")).json()["data"][0]
    assert item["ended"] == "done" and item["usage"]["output_tokens"] > 0


async def test_loop_totals_and_usage_report_add_up_the_history(server, standin) -> None:
    user = f"sum{datetime.now(UTC).microsecond}"
    http = server.client(await server.token_for(user))
    loops = [await new_loop(http), await new_loop(http)]
    with reported(standin):
        await turn(http, loops[0], "a")
        await turn(http, loops[0], "b", author={"id": "slack:U1", "name": "Una"})
        await turn(http, loops[1], "c", author={"id": "slack:U1", "name": "Una"})
    items = []
    for loop in loops:
        history = (await http.get(f"/loops/{loop}/messages")).json()["data"]
        items += [(loop, item) for item in history]
        detail = (await http.get(f"/loops/{loop}")).json()
        for kind in TOKEN_KINDS:
            assert detail["usage"][kind] == sum(i["usage"][kind] for _, i in items if _ == loop)
        assert detail["usage"]["cost_usd"] == pytest.approx(
            sum(i["usage"]["cost_usd"] for lp, i in items if lp == loop)
        )
        assert "duration_ms" not in detail["usage"]
    assert items[1][1]["author"] == {"id": "slack:U1", "name": "Una"}
    assert items[0][1]["author"] is None

    total_cost = sum(item["usage"]["cost_usd"] for _, item in items)
    assert total_cost == pytest.approx(3 * CALL_COST)
    by_loop = (await http.get("/usage", params={"group_by": "loop"})).json()
    assert {row["key"]: row["turns"] for row in by_loop["data"]} == {loops[0]: 2, loops[1]: 1}
    assert by_loop["total"]["cost_usd"] == pytest.approx(total_cost)
    assert by_loop["total"]["input_tokens"] == 3 * TOKENS["input_tokens"]
    by_author = (await http.get("/usage", params={"group_by": "author"})).json()
    costs = {row["key"]: row["cost_usd"] for row in by_author["data"]}
    assert costs == {user: pytest.approx(CALL_COST), "slack:U1": pytest.approx(2 * CALL_COST)}
    by_day = (await http.get("/usage")).json()
    assert [row["key"] for row in by_day["data"]] == [datetime.now(UTC).date().isoformat()]
    assert by_day["data"][0]["turns"] == 3
    # Another user's report holds none of these.
    other = (await server.http.get("/usage", params={"group_by": "loop"})).json()
    assert not {row["key"] for row in other["data"]} & set(loops)
    # A window that ended before them holds nothing.
    past = (datetime.now(UTC) - timedelta(days=3)).isoformat()
    old = (await http.get("/usage", params={"until": past})).json()
    assert old["data"] == [] and old["total"]["turns"] == 0
    await http.aclose()


@pytest.mark.parametrize(
    "params",
    [
        {"group_by": "week"},
        {"since": "yesterday"},
        {"since": "2026-12-05"},
        {"since": "2026-12-06T00:00:00Z", "until": "2026-12-05T00:00:00Z"},
        {"until": "0001-01-01T00:00:00Z"},
    ],
)
async def test_a_bad_usage_query_is_refused(server, params) -> None:
    r = await server.http.get("/usage", params=params)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_usage_query"


# ---- budgets --------------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def budgeted(standin, tmp_path) -> AsyncIterator[Server]:
    server = await start_server(
        tmp_path / "home", budgets={"author_daily_usd": 0.01, "loop_usd": 0.05}
    )
    server.standin = standin
    yield server
    await stop_server(server)


def seconds_to_midnight() -> float:
    now = datetime.now(UTC)
    return (
        now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1) - now
    ).total_seconds()


async def test_a_spent_author_budget_refuses_with_retry_after(budgeted, standin, tmp_path) -> None:
    http = budgeted.http
    loop = await new_loop(http)
    ann = {"id": "slack:UANN", "name": "Ann"}
    with reported(standin):
        assert (await turn(http, loop, "first", author=ann))[-1].name == "done"
        refused = await http.post(
            f"/loops/{loop}/messages", json={"content": "again", "author": ann}
        )
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "budget_exceeded"
        assert "daily budget of slack:UANN" in error["message"] and "resets at" in error["message"]
        retry = int(refused.headers["Retry-After"])
        assert abs(retry - seconds_to_midnight()) < 60
        # Another person in the same loop still gets answers.
        bob = await turn(http, loop, "bob here", author={"id": "slack:UBOB", "name": "Bob"})
        assert bob[-1].name == "done"
    history = (await http.get(f"/loops/{loop}/messages")).json()["data"]
    assert [item["user_text"] for item in history][-1] == "bob here"
    assert "again" not in [item["user_text"] for item in history]


async def test_a_queued_message_ends_when_its_budget_ran_out_meanwhile(budgeted, standin) -> None:
    http = budgeted.http
    loop = await new_loop(http)
    cid = {"id": "discord:42", "name": "Cid"}
    with reported(standin):
        first = events(
            http, "POST", f"/loops/{loop}/messages", json={"content": "[[slow: 1]]", "author": cid}
        )
        async for ev in first:
            if ev.name == "started":
                break
        queued = await turn(http, loop, "waiting", author=cid)
        async for ev in first:
            if ev.name == "done":
                break
    assert queued[0].name == "queued"
    assert queued[-1].name == "error" and queued[-1].data["code"] == "budget_exceeded"
    assert "daily budget of discord:42" in queued[-1].data["message"]


async def test_a_loop_budget_never_resets_and_holds_across_a_restart(standin, tmp_path) -> None:
    home = tmp_path / "home"
    server = await start_server(home, budgets={"loop_usd": 0.03})
    loop = await new_loop(server.http)
    with reported(standin):
        await turn(server.http, loop, "one")
        await turn(server.http, loop, "two")  # $0.034 spent now
    await stop_server(server)
    server = await start_server(home, budgets={"loop_usd": 0.03})
    try:
        refused = await server.http.post(f"/loops/{loop}/messages", json={"content": "three"})
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "budget_exceeded"
        assert "this loop's budget" in refused.json()["error"]["message"]
        assert "Retry-After" not in refused.headers  # it has no window that ends
        # A new loop starts afresh.
        fresh = await new_loop(server.http)
        assert (await turn(server.http, fresh, "hello"))[-1].name == "done"
    finally:
        await stop_server(server)


def test_budgets_come_from_the_environment(monkeypatch) -> None:
    from core.config import load_settings

    monkeypatch.setenv("LOOPBRIDGE_BUDGETS__AUTHOR_DAILY_USD", "5")
    monkeypatch.setenv("LOOPBRIDGE_BUDGETS__LOOP_USD", "20.5")
    budgets = load_settings().budgets
    assert budgets.author_daily_usd == 5.0 and budgets.loop_usd == 20.5
    assert budgets.user_monthly_usd is None


# ---- metrics --------------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def scrape(server, **headers) -> dict:
    async with server.client() as http:
        r = await http.get(server.url + "/metrics", headers=headers)
    assert r.status_code == 200, r.text
    return samples(r.text)


async def test_metrics_count_a_turn_with_route_templates(server, standin) -> None:
    done = ("loopbridge_turns_total", (("ended", "done"), ("trigger", "message")))
    before = await scrape(server)
    loop = await new_loop(server.http)
    with reported(standin):
        await turn(server.http, loop, "count me")
    after = await scrape(server)
    assert after[done] == before.get(done, 0) + 1
    cost = ("loopbridge_model_cost_usd_total", ())
    assert after[cost] - before.get(cost, 0) == pytest.approx(CALL_COST)
    tokens = ("loopbridge_model_tokens_total", (("kind", "cache_read"),))
    assert after[tokens] - before.get(tokens, 0) == TOKENS["cache_read_input_tokens"]
    assert after[("loopbridge_turn_first_delta_seconds_count", ())] >= 1
    assert after[("loopbridge_turn_duration_seconds_count", ())] >= 1
    for gauge in ("agents_running", "event_streams_open", "choices_pending"):
        assert (f"loopbridge_{gauge}", ()) in after
    posted = (
        "loopbridge_http_requests_total",
        (("method", "POST"), ("route", "/api/v1/loops/{loop_id}/messages"), ("status", "200")),
    )
    assert after[posted] >= 1
    text = (await server.http.get(server.url + "/metrics")).text
    assert not re.search(r"(loop|turn|choice)_[0-9a-f]{24}", text)


async def test_metrics_can_be_turned_off_or_need_a_token(standin, tmp_path) -> None:
    off = await start_server(tmp_path / "off", metrics=False)
    try:
        r = await off.http.get(off.url + "/metrics")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    finally:
        await stop_server(off)
    guarded = await start_server(tmp_path / "guarded", metrics_token="s3cret")
    try:
        async with guarded.client() as http:
            assert (await http.get(guarded.url + "/metrics")).status_code == 401
            wrong = await http.get(guarded.url + "/metrics", headers={"Authorization": "Bearer x"})
            assert wrong.status_code == 401
        await scrape(guarded, Authorization="Bearer s3cret")
    finally:
        await stop_server(guarded)


# ---- logs -----------------------------------------------------------------------------------


async def test_json_logs_carry_the_loop_turn_user_and_author(server, standin) -> None:
    stream = io.StringIO()
    setup_logging("json", stream)
    try:
        loop = await new_loop(server.http)
        evs = await turn(server.http, loop, "log me", author={"id": "slack:ULOG", "name": "Log"})
        turn_id = evs[0].data["turn_id"]
        await asyncio.sleep(0)  # the end's line is written as the turn ends
    finally:
        import logging

        for handler in list(logging.getLogger().handlers):
            logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    mine = [line for line in lines if line.get("turn_id") == turn_id]
    assert mine, stream.getvalue()
    for line in mine:
        assert line["loop_id"] == loop and line["user"] == "alice"
        assert line["author"] == "slack:ULOG" and line["level"] and line["time"]
    assert any("ended done" in line["message"] for line in mine)


async def test_an_interrupted_turn_records_what_it_had_spent(server, standin) -> None:
    loop = await new_loop(server.http)
    with reported(standin):
        stream = events(
            server.http, "POST", f"/loops/{loop}/messages", json={"content": "[[slow: 3]]"}
        )
        async for ev in stream:
            if ev.name == "assistant_delta":
                break
        assert (await server.http.post(f"/loops/{loop}/interrupt")).status_code == 202
        async for ev in stream:
            if ev.name in ("done", "interrupted", "error"):
                break
    assert ev.name == "interrupted"
    item = (await server.http.get(f"/loops/{loop}/messages")).json()["data"][0]
    assert item["ended"] == "interrupted"
    # The CLI's result for an interrupted query reports no tokens, but its running cost
    # total counts the call the model had begun (input and cache write, $0.014 here).
    assert item["usage"] is not None, item
    assert item["usage"]["input_tokens"] == 0
    assert item["usage"]["cost_usd"] > 0.014
