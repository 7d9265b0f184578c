"""Slack adapter benchmark: one 2,000-delta turn through the real slack-bolt app.

    python -m bench.bench_slack [--deltas 2000] [--delta-delay 0.01] [--modes native,edit,strict]

The stand-in model streams ``[[long: N]]`` (N deltas of Markdown with code blocks,
~58,000 characters for 2,000) to the real agent CLI behind a real loop server;
the adapter shows it in a thread of the fake Slack (`tests/fakes/slack.py`), with
its limits on. One turn per mode:

- ``native``: Slack's streaming API (chat.startStream / appendStream / stopStream);
- ``edit``: chat.postMessage + throttled chat.update;
- ``strict``: edits against a fake that allows one chat.update per 1.6 s per
  message, so 429s happen and must be waited out.

Measured, from the fake's record and a `GET /events` watcher on the loop:
platform calls per turn, 429s and whether each was retried to success, the
smallest gap between two edits of one message, and the lag from the model's
last delta (as the watcher saw it) and from `done` to the moment the thread
showed its final text. Targets: no 429 left unhandled, at most one edit per
second per message, final text visible within 1.5 s of `done`.

Everything runs in this process (one event loop) except the agent CLI, so on a
loaded 2-core machine the numbers include contention between the server, the
adapter and the fake.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.slack import SlackAdapter, SlackSettings
from bridge.client import LoopClient
from bridge.standin import StandinModel
from tests.conftest import AGENT_ENV, start_server, stop_server
from tests.fakes.slack import FakeSlack

CHANNEL = "C0BENCH"
USER = "U0BENCH"
LAG_TARGET = 1.5
EDIT_GAP_TARGET = 1.0
# The fake measures gaps on arrival; a request may travel a little faster than the last.
GAP_TOLERANCE = 0.05
TURN_TIMEOUT = 300.0
CONTENT_METHODS = frozenset(
    {
        "chat.postMessage",
        "chat.update",
        "chat.startStream",
        "chat.appendStream",
        "chat.stopStream",
    }
)
EDIT_METHODS = ("chat.update", "chat.appendStream")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Result:
    mode: str
    calls: Counter[str]
    rate_limited: int
    unhandled: int
    min_edit_gap: float | None
    max_edits_per_message: int
    messages: int
    last_delta_lag: float
    done_lag: float
    complete: bool
    turn_seconds: float


async def run_mode(mode: str, server_url: str, token: str, deltas: int) -> Result:
    fake = FakeSlack(update_gap=1.6 if mode == "strict" else 0.8)
    await fake.start()
    settings = SlackSettings(
        bot_token=FakeSlack.bot_token,
        app_token=FakeSlack.app_token,
        api_url=fake.api_url,
        streaming="native" if mode == "native" else "edit",
    )
    client = LoopClient(server_url, token)
    adapter = SlackAdapter(settings, client)
    try:
        await adapter.start()
        await fake.wait_connected()
        # A first message binds the thread and warms the agent; it is not measured.
        root = await fake.say(USER, f"<@{FakeSlack.bot_user_id}> warm up", channel=CHANNEL)
        await _turns(adapter, 1)
        loop = await client.find_loop({"binding": f"slack:{fake.team_id}:{CHANNEL}:{root}"})
        assert loop is not None
        seen = len(fake.calls)
        before = {m.ts for m in fake.bot_messages(CHANNEL, root)}
        marks: dict[str, float] = {}
        watcher = asyncio.create_task(_watch(client, loop.id, marks))
        await asyncio.sleep(0.3)  # the watcher is attached
        started = time.monotonic()
        await fake.say(USER, f"[[long: {deltas}]]", channel=CHANNEL, thread_ts=root)
        await _turns(adapter, 2)
        await asyncio.wait_for(watcher, 10)
        turn_seconds = time.monotonic() - started
        history = await client.history(loop.id)
        whole = history.data[-1].assistant_text
        messages = [m for m in fake.answer_messages(CHANNEL, root) if m.ts not in before]
        shown = "".join(m.answer for m in messages)
        complete = _same_text(shown, whole)
        final_at = max(m.changed for m in fake.bot_messages(CHANNEL, root) if m.ts not in before)
        calls = fake.calls[seen:]
        ours = {m.ts for m in messages} | {
            m.ts for m in fake.bot_messages(CHANNEL, root) if m.ts not in before
        }
        return Result(
            mode=mode,
            calls=Counter(
                c.method for c in calls if c.method in CONTENT_METHODS or c.method == "chat.delete"
            ),
            rate_limited=sum(c.status == 429 for c in calls),
            unhandled=_unhandled_429s(calls),
            min_edit_gap=_min_gap(calls, ours),
            max_edits_per_message=max(
                Counter(
                    c.args.get("ts") for c in calls if c.method in EDIT_METHODS and c.status == 200
                ).values(),
                default=0,
            ),
            messages=len(messages),
            last_delta_lag=final_at - marks["last_delta"],
            done_lag=final_at - marks["done"],
            complete=complete,
            turn_seconds=turn_seconds,
        )
    finally:
        await adapter.stop()
        await client.aclose()
        await fake.stop()


async def _turns(adapter: SlackAdapter, count: int) -> None:
    deadline = time.monotonic() + TURN_TIMEOUT
    while sum(r.handled == "turn" for r in adapter.results) < count or adapter._tasks:
        if time.monotonic() > deadline:
            raise TimeoutError("the turn did not finish")
        await asyncio.sleep(0.02)


async def _watch(client: LoopClient, loop_id: str, marks: dict[str, float]) -> None:
    async with contextlib.aclosing(client.watch(loop_id)) as events:
        async for event in events:
            if event.event == "assistant_delta":
                marks["last_delta"] = time.monotonic()
            elif event.terminal:
                marks["done"] = time.monotonic()
                return


def _same_text(shown: str, expected: str) -> bool:
    """Equal apart from whitespace and the fences that cuts closed and reopened."""

    def squeeze(text: str) -> str:
        return "".join(text.split()).replace("```", "").replace("python", "")

    return squeeze(shown) == squeeze(expected)


def _unhandled_429s(calls: list[Any]) -> int:
    """429s after which the same call on the same message never succeeded."""
    unhandled = 0
    for index, call in enumerate(calls):
        if call.status != 429:
            continue
        key = (call.method, call.args.get("channel"), call.args.get("ts"))
        if not any(
            later.status == 200
            and (later.method, later.args.get("channel"), later.args.get("ts")) == key
            for later in calls[index + 1 :]
        ):
            unhandled += 1
    return unhandled


def _min_gap(calls: list[Any], ours: set[str]) -> float | None:
    gaps: list[float] = []
    last: dict[str, float] = {}
    for call in calls:
        if call.method not in EDIT_METHODS or call.status != 200:
            continue
        ts = str(call.args.get("ts"))
        if ts not in ours:
            continue
        if ts in last:
            gaps.append(call.at - last[ts])
        last[ts] = call.at
    return min(gaps) if gaps else None


async def main(args: argparse.Namespace) -> None:
    model = StandinModel(delta_delay=args.delta_delay)
    url = await model.start()
    os.environ.update({**AGENT_ENV, "ANTHROPIC_BASE_URL": url})
    home = Path(tempfile.mkdtemp(prefix="bench-slack-"))
    server = await start_server(home, rate_limit_per_minute=1_000_000)
    token = await server.token_for("slackbench")
    results = []
    try:
        for mode in args.modes.split(","):
            log(
                f"mode {mode}: one [[long: {args.deltas}]] turn, {args.delta_delay * 1000:.0f} ms "
                "between deltas"
            )
            results.append(await run_mode(mode.strip(), server.url, token, args.deltas))
    finally:
        await stop_server(server)
        await model.stop()
    print(table(results, args))


def table(results: list[Result], args: argparse.Namespace) -> str:
    lines = [
        f"#### Slack adapter: one `[[long: {args.deltas}]]` turn per mode "
        f"({args.delta_delay * 1000:.0f} ms between model deltas)",
        "",
        "| mode | turn (s) | answer messages | platform calls (by method) | 429s (unhandled) "
        "| min gap between edits of one message (s) | most edits of one message "
        "| lag: last delta → final text (s) | lag: `done` → final text (s) | text complete "
        "| result |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        calls = ", ".join(f"{name} {count}" for name, count in sorted(r.calls.items()))
        gap = f"{r.min_edit_gap:.2f}" if r.min_edit_gap is not None else "—"
        ok = (
            r.unhandled == 0
            and r.complete
            and r.done_lag <= LAG_TARGET
            and (r.min_edit_gap is None or r.min_edit_gap >= EDIT_GAP_TARGET - GAP_TOLERANCE)
        )
        lines.append(
            f"| {r.mode} | {r.turn_seconds:.1f} | {r.messages} | {sum(r.calls.values())}: "
            f"{calls} | {r.rate_limited} ({r.unhandled}) | {gap} | {r.max_edits_per_message} "
            f"| {r.last_delta_lag:.2f} | {r.done_lag:.2f} | {'yes' if r.complete else 'NO'} "
            f"| {'PASS' if ok else 'FAIL'} |"
        )
    lags = [r.done_lag for r in results]
    lines += [
        "",
        f"- targets: no 429 left unhandled, ≥ {EDIT_GAP_TARGET:.0f} s between edits of one "
        f"message, final text within {LAG_TARGET} s of `done`; median `done` lag "
        f"{statistics.median(lags):.2f} s",
    ]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deltas", type=int, default=2000)
    parser.add_argument(
        "--delta-delay",
        type=float,
        default=0.01,
        help="seconds between the stand-in's deltas (default 0.01: a 20 s turn)",
    )
    parser.add_argument("--modes", default="native,edit,strict")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
