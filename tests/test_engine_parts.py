"""The engine's parts: the loop row read once per cold send, the runtime's queue, the typed
emitter and the one list of environment prefixes an agent may see."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from sqlalchemy import event

from bridge.contract.events import AssistantDeltaEvent, ToolResultEvent
from core.emitter import make_event
from core.sandbox import bubblewrap, local, podman
from core.sandbox.env import AGENT_ENV_PREFIXES, agent_env_from
from core.turn import Turn
from core.turn_queue import TurnQueue
from tests.sse import names, turn


async def test_a_send_to_a_cold_loop_reads_the_loop_row_once(server) -> None:
    loop = (await server.http.post("/loops", json={})).json()["id"]
    assert loop not in server.engine._runtimes  # cold: no runtime yet
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        statements.append(" ".join(statement.split()).lower())

    sync_engine = server.engine.db.engine.sync_engine
    event.listen(sync_engine, "before_cursor_execute", seen)
    try:
        evs = await turn(server.http, loop, "hello")
    finally:
        event.remove(sync_engine, "before_cursor_execute", seen)
    assert names(evs)[-1] == "done"
    loop_reads = [s for s in statements if s.startswith("select") and " from loops" in s]
    assert len(loop_reads) == 1, loop_reads


def _turn(number: int) -> Turn:
    return Turn(f"turn_{number}", number, "message", f"message {number}", "default")


async def test_the_queue_hands_out_turns_in_order_when_ready() -> None:
    queue = TurnQueue()
    running = True
    taken = asyncio.ensure_future(queue.take(lambda: not running))
    queue.put(_turn(1))
    queue.put(_turn(2))
    await asyncio.sleep(0)
    assert not taken.done() and len(queue) == 2  # a turn runs: nothing leaves the queue
    running = False
    queue.wake()
    assert (await asyncio.wait_for(taken, 5)).number == 1
    assert [t.number for t in queue] == [2]
    assert (await asyncio.wait_for(queue.take(lambda: True), 5)).number == 2
    assert not queue


def test_a_typed_event_becomes_its_name_and_data_once() -> None:
    delta = make_event(AssistantDeltaEvent(text="hi"), 7, "turn_x")
    assert (delta.name, delta.data, delta.seq, delta.turn_id) == (
        "assistant_delta",
        {"text": "hi"},
        7,
        "turn_x",
    )
    result = make_event(ToolResultEvent(tool_use_id="t1", ok=True, output="done"), 8)
    assert json.loads(result.json) == {"tool_use_id": "t1", "ok": True, "output": "done"}


def test_one_list_of_prefixes_decides_what_an_agent_sees() -> None:
    server_env = {
        "ANTHROPIC_API_KEY": "sk-x",
        "CLAUDE_CODE_MAX_RETRIES": "0",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=secret",
        "CLAUDE_AGENT_SDK_SKIP_VERSION_CHECK": "1",
        "LOOPBRIDGE_TOKEN": "secret",
    }
    assert agent_env_from(server_env, run_as_root=False) == {
        "ANTHROPIC_API_KEY": "sk-x",
        "CLAUDE_CODE_MAX_RETRIES": "0",
    }
    assert agent_env_from({}, run_as_root=True) == {"IS_SANDBOX": "1"}
    # No launcher spells a prefix of its own: each is given the one list.
    launchers = [bubblewrap.LAUNCHER, bubblewrap.INSIDE_LAUNCHER, local.LAUNCHER, podman.LAUNCHER]
    for text in launchers:
        assert not any(prefix in text for prefix in (*AGENT_ENV_PREFIXES, "CLAUDE_AGENT_SDK_"))
