"""Discord adapter benchmark: one long turn through the real adapter and a fake Discord.

    python -m bench.bench_discord [--deltas 2000] [--paces 0,10,30] [--quick]

For each pace (milliseconds between the stand-in model's deltas; 0 sends all of
them at once) the bench sends `[[long: N]]` in a channel bound to a loop, so the
real Claude Code CLI streams an answer of N deltas (~58,000 characters of
Markdown for 2,000), and the adapter shows it through discord.py on the fake
Discord of the tests, with its limits on: 2,000 characters a message, 5 posts
and 5 edits per 5 s per channel, 429 otherwise.

Per pace it prints: how long the turn ran (`started` → `done` on a watcher of
the loop), the answer's size, the messages, posts and edits the adapter made,
the 429s it got (retried by discord.py) and the calls that failed for good, and
the lag from `done` reaching a watcher to the last change of any message of
the answer (the final text, and the Stop button gone). Targets: no 429 left
unhandled (and the whole answer shown), final text within 1.5 s of `done`.

The loop server (engine + uvicorn) runs in its own process, started as in
bench_engine; the stand-in model, the fake Discord, the adapter and the watcher
share this process, as an adapter and its platform's client do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from adapters.discord import DiscordAdapter, DiscordSettings
from bench.bench_engine import AGENT_ENV, ServerProcess, log, running_server, table, verdict
from bridge.client import LoopClient
from bridge.standin import StandinModel
from tests.fakes.discord import FakeDiscord, Person

LAG_TARGET = 1.5
DEFAULT_PACES = (0.0, 10.0, 30.0)
QUICK_PACES = (0.0, 10.0)
TURN_SECONDS = 600.0
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


@dataclass
class Row:
    pace_ms: float
    turn_seconds: float
    chars: int
    messages: int
    files: int
    posts: int
    edits: int
    rate_limited: int
    failed: int
    complete: bool
    lag: float
    budget_wait: float

    def cells(self) -> list[str]:
        ok = self.failed == 0 and self.complete and self.lag <= LAG_TARGET
        return [
            "all at once" if not self.pace_ms else f"{self.pace_ms:g} ms",
            f"{self.turn_seconds:.1f}",
            f"{self.chars:,}",
            str(self.messages),
            str(self.files),
            str(self.posts),
            str(self.edits),
            f"{self.rate_limited} / {self.failed}",
            "yes" if self.complete else "NO",
            f"{self.lag:.2f}",
            f"{self.budget_wait:.1f}",
            verdict(ok),
        ]


def fence_free(text: str) -> str:
    """The text without fence lines or whitespace: what splitting may not change."""
    kept = [line for line in text.splitlines() if not FENCE.match(line)]
    return "".join("".join(kept).split())


async def watch_turn(
    http: httpx.AsyncClient, loop_id: str, opened: asyncio.Event
) -> dict[str, float]:
    """When `started` and `done` of the loop's next turn reach a watcher."""
    seen: dict[str, float] = {}
    async with http.stream("GET", f"/loops/{loop_id}/events") as response:
        opened.set()  # headers in: the server has subscribed this watcher
        async for line in response.aiter_lines():
            name = line.removeprefix("event: ").strip() if line.startswith("event: ") else ""
            if name in ("started", "done", "interrupted", "error"):
                seen.setdefault(name, time.monotonic())
            if name in ("done", "interrupted", "error"):
                return seen
    return seen


async def one_turn(
    fake: FakeDiscord,
    adapter: DiscordAdapter,
    server: ServerProcess,
    person: Person,
    channel: str,
    deltas: int,
) -> Row:
    results = len(adapter.results)
    await fake.say(person, "warm up", channel=channel)
    await wait_for_results(adapter, results + 1)
    loop = await adapter.client.find_loop(
        {"binding": f"discord:{fake.guild_id}:{channel}:{channel}"}
    )
    assert loop is not None, "the warm-up bound no loop"
    await asyncio.sleep(fake.window)  # the warm-up's posts and edits leave the budget
    waited = adapter.budget.waited
    async with server.client(read_timeout=None) as http:
        opened = asyncio.Event()
        watcher = asyncio.create_task(watch_turn(http, loop.id, opened))
        await opened.wait()
        calls = len(fake.calls)
        asked = await fake.say(person, f"[[long: {deltas}]]", channel=channel)
        await wait_for_results(adapter, results + 2)
        seen = await asyncio.wait_for(watcher, TURN_SECONDS)
    history = await adapter.client.history(loop.id, limit=100)
    whole = history.data[-1].assistant_text
    answer = [m for m in fake.bot_messages(channel) if m.created > asked.created]
    ours = [c for c in fake.calls[calls:] if f"/channels/{channel}/" in c.path]
    result = adapter.results[-1]
    return Row(
        pace_ms=0.0,
        turn_seconds=seen["done"] - seen["started"],
        chars=len(whole),
        messages=len(answer),
        files=sum(len(m.attachments) for m in answer),
        posts=sum(c.method == "POST" and c.status < 300 for c in ours),
        edits=sum(c.method == "PATCH" and c.status < 300 for c in ours),
        rate_limited=sum(c.status == 429 for c in ours),
        failed=(result.stats.failures if result.stats else 0)
        + sum(c.status >= 400 and c.status != 429 for c in ours),
        complete=fence_free("".join(m.text for m in answer)) == fence_free(whole),
        lag=max(m.last_change for m in answer) - seen["done"],
        budget_wait=adapter.budget.waited - waited,
    )


async def wait_for_results(adapter: DiscordAdapter, count: int) -> None:
    async with asyncio.timeout(TURN_SECONDS):
        while len(adapter.results) < count or adapter._tasks:  # noqa: ASYNC110 - no event
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_adapter(
    fake: FakeDiscord, server: ServerProcess, channels: list[str]
) -> AsyncIterator[DiscordAdapter]:
    settings = DiscordSettings(
        token=fake.token,
        api_url=fake.api_url,
        gateway_url=fake.gateway_url,
        bound_channels=channels,
        command_guilds=[fake.guild_id],
        guild_ready_timeout=0.1,
    )
    async with LoopClient(server.url, server.token) as client:
        adapter = DiscordAdapter(settings, client)
        await adapter.start()
        try:
            yield adapter
        finally:
            await adapter.stop()


async def run(args: argparse.Namespace) -> None:
    model = StandinModel()
    standin_url = await model.start()
    os.environ.update({**AGENT_ENV, "ANTHROPIC_BASE_URL": standin_url})
    fake = FakeDiscord()
    await fake.start()
    person = fake.person("2000000000000000001", "bench")
    channels = [fake.text_channel(f"bench-{index}").id for index in range(len(args.paces))]
    rows: list[Row] = []
    try:
        with tempfile.TemporaryDirectory(prefix="loopbridge-bench-discord-") as tmp:
            async with (
                running_server(Path(tmp) / "server", standin_url) as server,
                running_adapter(fake, server, channels) as adapter,
            ):
                for pace, channel in zip(args.paces, channels, strict=True):
                    model.delta_delay = pace / 1000
                    log(f"{args.deltas} deltas, {pace:g} ms apart")
                    row = await one_turn(fake, adapter, server, person, channel, args.deltas)
                    row.pace_ms = pace
                    rows.append(row)
    finally:
        await fake.stop()
        await model.stop()
    print(render(rows, args.deltas), flush=True)


def render(rows: Sequence[Row], deltas: int) -> str:
    header = [
        "pace",
        "turn s",
        "answer chars",
        "messages",
        "files",
        "posts",
        "edits",
        "429 retried / failed",
        "complete",
        "lag done→final s",
        "budget wait s",
        "verdict",
    ]
    notes = [
        f"- A `[[long: {deltas}]]` turn: {deltas:,} deltas through the real CLI; the server "
        "coalesces them per reader, so the adapter sees fewer, larger ones.",
        "- Discord allows ~5 posts per 5 s per channel and the adapter keeps one in hand "
        "(discord.py holds a call that empties a bucket until it refills). Parts the budget "
        "cannot post yet wait; when the turn ends with more waiting than it lets through at "
        "once, they go as one `answer.md` file (the files column), so the lag does not grow "
        "with the answer.",
        f"- Targets: no 429 left unhandled, whole answer shown, lag ≤ {LAG_TARGET} s.",
    ]
    return (
        f"### Discord adapter — one {deltas:,}-delta turn per pace\n\n"
        f"{table(header, [row.cells() for row in rows])}\n\n" + "\n".join(notes)
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_discord",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--deltas", type=int, default=2000, help="deltas of the long turn")
    parser.add_argument(
        "--paces",
        type=lambda text: tuple(float(p) for p in text.split(",")),
        default=DEFAULT_PACES,
        help="ms between deltas, comma-separated (0: all at once)",
    )
    parser.add_argument("--quick", action="store_true", help="paces 0 and 10 ms only")
    args = parser.parse_args(argv)
    if args.quick and args.paces == DEFAULT_PACES:
        args.paces = QUICK_PACES
    return args


def main(argv: Sequence[str] | None = None) -> None:
    asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    main()
