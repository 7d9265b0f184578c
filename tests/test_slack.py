"""The Slack adapter end to end: real slack-bolt ↔ a fake Slack, real loop server and CLI.

What a person would see is read back from the fake: the final text of every
message in the thread, the buttons, the private answers.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio

from adapters.slack import SlackAdapter, SlackSettings
from adapters.slack.mrkdwn import to_mrkdwn
from bridge.client import LoopClient
from tests.fakes.slack import FakeSlack, Message

pytestmark = pytest.mark.asyncio(loop_scope="session")

ALICE = "U0ALICE"  # starts threads
BOB = "U0BOB"  # another person, not an admin
BOSS = "U0BOSS"  # an admin
CHANNEL = "C0GENERAL"
MENTION = f"<@{FakeSlack.bot_user_id}>"
FENCE = re.compile(r"^```", re.MULTILINE)


async def until(check: Callable[[], object], timeout: float = 30.0, what: str = "") -> object:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.05)


class Harness:
    """A fake Slack, a Loop API client for the adapter's user, and the adapter."""

    def __init__(self, server, fake: FakeSlack, token: str) -> None:
        self.server = server
        self.fake = fake
        self.token = token
        self.client: LoopClient | None = None
        self.adapter: SlackAdapter | None = None

    def settings(self, **overrides) -> SlackSettings:
        values = dict(
            bot_token=FakeSlack.bot_token, app_token=FakeSlack.app_token,
            signing_secret=FakeSlack.signing_secret, api_url=self.fake.api_url,
            admins=[BOSS], http_host="127.0.0.1", http_port=0,
        )
        return SlackSettings(**(values | overrides))

    async def start(self, **overrides) -> SlackAdapter:
        self.client = LoopClient(self.server.url, self.token)
        self.adapter = SlackAdapter(self.settings(**overrides), self.client)
        await self.adapter.start()
        if self.adapter.settings.mode == "socket":
            await self.fake.wait_connected()
        else:
            self.fake.http_target = f"http://127.0.0.1:{self.adapter.http_port}/slack/events"
        return self.adapter

    async def stop(self) -> None:
        if self.adapter is not None:
            await self.adapter.stop()
            self.adapter = None
        if self.client is not None:
            await self.client.aclose()
            self.client = None
        self.fake.http_target = None

    async def turns(self, count: int, timeout: float = 60.0) -> None:
        """Wait until the adapter has finished `count` turns (since it started)."""
        adapter = self.adapter
        assert adapter is not None

        def done() -> bool:
            return sum(r.handled == "turn" for r in adapter.results) >= count and not any(
                not t.done() for t in adapter._tasks
            )

        await until(done, timeout, f"{count} turns")

    def answer(self, thread_ts: str) -> str:
        return "".join(m.answer for m in self.fake.answer_messages(CHANNEL, thread_ts))


@pytest_asyncio.fixture(loop_scope="session")
async def slack(server) -> AsyncIterator[Harness]:
    fake = FakeSlack()
    await fake.start()
    harness = Harness(server, fake, await server.token_for("slackbot"))
    try:
        yield harness
    finally:
        await harness.stop()
        await fake.stop()


async def loop_of(harness: Harness, thread_ts: str, channel: str = CHANNEL):
    assert harness.client is not None
    key = f"slack:{FakeSlack.team_id}:{channel}:{thread_ts}"
    return await harness.client.find_loop({"binding": key})


# ---- a mention becomes a loop, a reply continues it ------------------------------------


async def test_mention_starts_a_loop_and_the_reply_streams(slack: Harness) -> None:
    await slack.start()
    root = await slack.fake.say(ALICE, f"{MENTION} hello there")
    await slack.turns(1)
    loop = await loop_of(slack, root)
    assert loop is not None and loop.title == "hello there"
    assert loop.metadata["started_by"] == ALICE
    assert slack.answer(root) == "Echo #1: hello there"
    # Native streaming: a stream, no raw Markdown left for Slack to misread.
    assert slack.fake.methods("chat.startStream") and slack.fake.methods("chat.stopStream")
    assert not [c for c in slack.fake.calls if c.status == 429]

    await slack.fake.say(ALICE, "and again", thread_ts=root)
    await slack.turns(2)
    assert (await loop_of(slack, root)).id == loop.id
    texts = [m.answer for m in slack.fake.answer_messages(CHANNEL, root)]
    assert texts == ["Echo #1: hello there", "Echo #2: and again"]
