"""First-words benchmark: how soon a mention's answer starts to show, Slack and Discord.

    python -m bench.bench_firstwords [--turns 10] [--gap 1.0] [--platforms slack,discord]

For each platform, `--turns` times: a person mentions the bot in a new
conversation (a new loop, so its agent starts: a **cold** turn), and `--gap`
seconds after that answer has ended writes again in the same conversation (the
agent is running: a **warm** turn). Each turn is `[[slow: 0.5]]`: ten deltas
50 ms apart, the first `slow 1/10. `. The real adapter (slack-bolt, discord.py)
shows it on the fake platform of the tests, with the platform's limits on
(Slack's per-message update gap, Discord's 5 posts and 5 edits per 5 s per
channel).

Measured from the moment the person's message is sent (monotonic clock, one
process for the stand-in model, the fakes and the adapters):

- **placeholder**: the adapter's first message in the conversation (Slack: the
  first `chat.postMessage`/`chat.startStream` in the thread; Discord: the first
  message the bot posts in the thread);
- **first delta**: the stand-in model writing its first delta to the agent CLI;
- **first words**: the first platform call that shows `slow 1/10.`;
- **lag** = first words − first delta: the bridge's share (the agent CLI, the
  server, the adapter, the platform call). Target: < 100 ms, judged on p99.

Medians and p99 (nearest rank: with 10 turns, the slowest) per platform and
kind. The loop server runs in its own process, as in bench_engine; its agents
stop after 5 s idle so that cold turns stay cold and memory stays bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from adapters.discord import DiscordAdapter, DiscordSettings
from adapters.slack import SlackAdapter, SlackSettings
from bench.bench_engine import (
    AGENT_ENV,
    ServerProcess,
    log,
    percentile,
    running_server,
    table,
    verdict,
)
from bridge.client import LoopClient
from bridge.standin import StandinModel
from tests.fakes.discord import FakeDiscord
from tests.fakes.slack import FakeSlack

SCENARIO = "[[slow: 0.5]]"
FIRST_WORDS = "slow 1/10."
TARGET = 0.100
TURN_SECONDS = 120.0
# Agents of the bench's server stop this soon after a turn (cold turns stay cold).
AGENT_IDLE_SECONDS = "5"
SLACK_CHANNEL = "C0FIRSTWORDS"


@dataclass
class Sample:
    placeholder: float
    first_delta: float
    first_words: float

    @property
    def lag(self) -> float:
        return self.first_words - self.first_delta


@dataclass
class Series:
    platform: str
    kind: str
    samples: list[Sample] = field(default_factory=list)


class Platform(Protocol):
    name: str

    async def say(self, conversation: str | None) -> str:
        """A person's message: a mention in a new conversation (None), or a follow-up."""
        ...

    def placeholder(self, conversation: str, since: float) -> float | None: ...

    def first_words(self, conversation: str, since: float) -> float | None: ...

    async def turns(self, count: int) -> None:
        """Until the adapter has finished `count` turns."""
        ...


async def until(check: Callable[[], float | None], what: str) -> float:
    deadline = time.monotonic() + TURN_SECONDS
    while (value := check()) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {TURN_SECONDS:.0f} s")
        await asyncio.sleep(0.005)
    return value


async def finished(results: Callable[[], int], busy: Callable[[], bool], count: int) -> None:
    deadline = time.monotonic() + TURN_SECONDS
    while results() < count or busy():
        if time.monotonic() > deadline:
            raise TimeoutError("the turn did not finish")
        await asyncio.sleep(0.02)


# ---- the platforms -----------------------------------------------------------------------


class SlackSide:
    name = "Slack"

    def __init__(self, fake: FakeSlack, adapter: SlackAdapter) -> None:
        self.fake = fake
        self.adapter = adapter

    async def say(self, conversation: str | None) -> str:
        if conversation is None:
            mention = f"<@{FakeSlack.bot_user_id}> {SCENARIO}"
            return await self.fake.say("U0BENCH", mention, channel=SLACK_CHANNEL)
        await self.fake.say("U0BENCH", SCENARIO, channel=SLACK_CHANNEL, thread_ts=conversation)
        return conversation

    def placeholder(self, conversation: str, since: float) -> float | None:
        return next(
            (
                call.at
                for call in self.fake.calls
                if call.at >= since
                and call.status == 200
                and call.method in ("chat.postMessage", "chat.startStream")
                and call.args.get("thread_ts") == conversation
            ),
            None,
        )

    def first_words(self, conversation: str, since: float) -> float | None:
        return next(
            (
                call.at
                for call in self.fake.calls
                if call.at >= since and call.status == 200 and FIRST_WORDS in json.dumps(call.args)
            ),
            None,
        )

    async def turns(self, count: int) -> None:
        adapter = self.adapter
        await finished(
            lambda: sum(r.handled == "turn" for r in adapter.results),
            lambda: bool(adapter._tasks),
            count,
        )


class DiscordSide:
    name = "Discord"

    def __init__(self, fake: FakeDiscord, adapter: DiscordAdapter) -> None:
        self.fake = fake
        self.adapter = adapter
        self.person = fake.person("2000000000000000001", "bench")

    async def say(self, conversation: str | None) -> str:
        if conversation is None:
            return (await self.fake.say(self.person, SCENARIO, mention=True)).id
        await self.fake.say(self.person, SCENARIO, channel=conversation)
        return conversation

    def placeholder(self, conversation: str, since: float) -> float | None:
        return min(
            (
                message.shown[0][0]
                for message in self.fake.bot_messages(conversation)
                if message.shown and message.shown[0][0] >= since
            ),
            default=None,
        )

    def first_words(self, conversation: str, since: float) -> float | None:
        return min(
            (
                at
                for message in self.fake.bot_messages(conversation)
                for at, content in message.shown
                if at >= since and FIRST_WORDS in content
            ),
            default=None,
        )

    async def turns(self, count: int) -> None:
        adapter = self.adapter
        await finished(
            lambda: sum(r.handled == "turn" for r in adapter.results),
            lambda: bool(adapter._tasks),
            count,
        )


@asynccontextmanager
async def slack_side(server: ServerProcess) -> AsyncIterator[SlackSide]:
    fake = FakeSlack()
    await fake.start()
    settings = SlackSettings(
        bot_token=FakeSlack.bot_token, app_token=FakeSlack.app_token, api_url=fake.api_url
    )
    client = LoopClient(server.url, server.token)
    adapter = SlackAdapter(settings, client)
    try:
        await adapter.start()
        await fake.wait_connected()
        yield SlackSide(fake, adapter)
    finally:
        await adapter.stop()
        await client.aclose()
        await fake.stop()


@asynccontextmanager
async def discord_side(server: ServerProcess) -> AsyncIterator[DiscordSide]:
    fake = FakeDiscord()
    await fake.start()
    settings = DiscordSettings(
        token=fake.token,
        api_url=fake.api_url,
        gateway_url=fake.gateway_url,
        command_guilds=[fake.guild_id],
        guild_ready_timeout=0.1,
    )
    client = LoopClient(server.url, server.token)
    adapter = DiscordAdapter(settings, client)
    try:
        await adapter.start()
        await fake.wait_ready()
        yield DiscordSide(fake, adapter)
    finally:
        await adapter.stop()
        await client.aclose()
        await fake.stop()


# ---- one platform's turns ------------------------------------------------------------------


async def one_turn(
    platform: Platform, model: StandinModel, conversation: str | None, done: int
) -> tuple[str, Sample]:
    sent = len(model.first_deltas)
    since = time.monotonic()
    conversation = await platform.say(conversation)
    words = await until(lambda: platform.first_words(conversation, since), "first words")
    placeholder = await until(lambda: platform.placeholder(conversation, since), "placeholder")
    first_delta = await until(
        lambda: model.first_deltas[sent] if len(model.first_deltas) > sent else None,
        "first delta",
    )
    await platform.turns(done + 1)
    return conversation, Sample(placeholder - since, first_delta - since, words - since)


async def measure(
    platform: Platform, model: StandinModel, turns: int, gap: float
) -> tuple[Series, Series]:
    cold, warm = Series(platform.name, "cold"), Series(platform.name, "warm")
    done = 0
    for index in range(turns):
        conversation, sample = await one_turn(platform, model, None, done)
        cold.samples.append(sample)
        done += 1
        await asyncio.sleep(gap)  # the person reads the answer, then writes again
        _, sample = await one_turn(platform, model, conversation, done)
        warm.samples.append(sample)
        done += 1
        log(
            f"{platform.name} {index + 1}/{turns}: lag cold {cold.samples[-1].lag * 1000:.0f} ms,"
            f" warm {sample.lag * 1000:.0f} ms"
        )
    return cold, warm


# ---- the report ----------------------------------------------------------------------------


def ms(value: float) -> str:
    return f"{value * 1000:.0f}"


def render(series: Sequence[Series], turns: int, gap: float) -> str:
    header = [
        "platform",
        "turn",
        "n",
        "mention → placeholder median (ms)",
        "p99",
        "mention → first delta median",
        "p99",
        "mention → first words median",
        "p99",
        "first delta → first words median",
        "p99",
        "target",
        "result",
    ]
    rows = []
    for one in series:
        columns: list[str] = []
        for values in (
            [s.placeholder for s in one.samples],
            [s.first_delta for s in one.samples],
            [s.first_words for s in one.samples],
            [s.lag for s in one.samples],
        ):
            columns += [ms(statistics.median(values)), ms(percentile(values, 0.99))]
        lags = [s.lag for s in one.samples]
        rows.append(
            [
                one.platform,
                one.kind,
                str(len(one.samples)),
                *columns,
                f"< {ms(TARGET)} ms",
                verdict(percentile(lags, 0.99) < TARGET),
            ]
        )
    return (
        f"### First words — {turns} cold and {turns} warm `{SCENARIO}` turns per platform "
        f"(follow-up {gap:g} s after the answer ended)\n\n{table(header, rows)}"
    )


async def run(args: argparse.Namespace) -> None:
    model = StandinModel()
    standin_url = await model.start()
    os.environ.update(
        {
            **AGENT_ENV,
            "ANTHROPIC_BASE_URL": standin_url,
            "LOOPBRIDGE_AGENT_IDLE_SECONDS": AGENT_IDLE_SECONDS,
        }
    )
    sides = {"slack": slack_side, "discord": discord_side}
    series: list[Series] = []
    try:
        with tempfile.TemporaryDirectory(prefix="loopbridge-bench-firstwords-") as tmp:
            async with running_server(Path(tmp) / "server", standin_url) as server:
                for name in args.platforms:
                    async with sides[name](server) as platform:
                        series += await measure(platform, model, args.turns, args.gap)
    finally:
        await model.stop()
    print(render(series, args.turns, args.gap), flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_firstwords",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--turns", type=int, default=10, help="cold (and warm) turns per platform")
    parser.add_argument(
        "--gap", type=float, default=1.0, help="seconds from an answer's end to the follow-up"
    )
    parser.add_argument(
        "--platforms",
        type=lambda text: [p.strip() for p in text.split(",")],
        default=["slack", "discord"],
        help="comma-separated: slack, discord",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    main()
