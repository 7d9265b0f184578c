"""With LOOPBRIDGE_PUBLIC_URL set, a loop's first reply in Slack and Discord links to its
page, through a read-only view link the adapter asks the API for."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.test_discord import Harness as DiscordHarness
from tests.test_discord import discord_  # noqa: F401 - the fixture
from tests.test_slack import ALICE, CHANNEL, MENTION, slack  # noqa: F401 - the fixture
from tests.test_slack import Harness as SlackHarness

pytestmark = pytest.mark.asyncio(loop_scope="session")
PUBLIC = "https://loops.example.com"
LINK = re.compile(re.escape(PUBLIC) + r"/loops/(loop_[0-9a-f]+)\?grant=([\w.%-]+)")


@pytest.fixture
def public_url(server, monkeypatch):
    """The public URL, as both the adapter and the server read it."""
    monkeypatch.setenv("LOOPBRIDGE_PUBLIC_URL", PUBLIC)
    server.engine.settings.public_url = PUBLIC
    yield PUBLIC
    server.engine.settings.public_url = None


async def works_on(server, url_match: re.Match[str]) -> bool:
    """The link's grant reads the loop's history on the real server."""
    loop, grant = url_match.group(1), httpx.URL(url_match.group(0)).params["grant"]
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as anonymous:
        page = await anonymous.get(f"/api/v1/loops/{loop}/messages", params={"grant": grant})
        return page.status_code == 200 and bool(page.json()["data"])


async def test_slack_first_reply_links_to_the_loop(
    slack: SlackHarness,  # noqa: F811
    server,
    public_url,
) -> None:
    await slack.start()
    root = await slack.fake.say(ALICE, f"{MENTION} link me")
    await slack.turns(1)
    loop = await slack.client.find_loop({"binding": f"slack:{slack.fake.team_id}:{CHANNEL}:{root}"})
    first = slack.fake.answer_messages(CHANNEL, root)[0]
    found = LINK.search(first.context_text())
    assert found, first.blocks
    assert "View loop" in first.context_text() and found.group(1) == loop.id
    assert await works_on(server, found)
    # A later reply in the thread carries no link.
    await slack.fake.say(ALICE, "and again", thread_ts=root)
    await slack.turns(2)
    later = slack.fake.answer_messages(CHANNEL, root)[-1]
    assert later is not first and not LINK.search(later.context_text())


async def test_slack_edited_reply_links_too(
    slack: SlackHarness,  # noqa: F811
    server,
    public_url,
) -> None:
    await slack.start(streaming="edit")
    root = await slack.fake.say(ALICE, f"{MENTION} edited link")
    await slack.turns(1)
    first = slack.fake.answer_messages(CHANNEL, root)[0]
    assert LINK.search(first.context_text()), first.blocks


async def test_slack_without_a_public_url_has_no_link(
    slack: SlackHarness,  # noqa: F811
    monkeypatch,
) -> None:
    monkeypatch.delenv("LOOPBRIDGE_PUBLIC_URL", raising=False)
    await slack.start()
    root = await slack.fake.say(ALICE, f"{MENTION} no link")
    await slack.turns(1)
    assert "View loop" not in slack.fake.answer_messages(CHANNEL, root)[0].context_text()


async def test_discord_first_reply_links_to_the_loop(
    discord_: DiscordHarness,  # noqa: F811
    server,
    public_url,
) -> None:
    fake = discord_.fake
    await discord_.start()
    asked = await fake.say(discord_.alice, "link me", mention=True)
    await discord_.turns(1)
    thread = fake.channels[asked.id]
    loop = await discord_.loop_of(thread.id)
    first = fake.bot_messages(thread.id)[0]
    found = LINK.search(first.embed_text)
    assert found and "[View loop](" in first.embed_text, first.embeds
    assert found.group(1) == loop.id and await works_on(server, found)
    await fake.say(discord_.alice, "and again", channel=thread.id)
    await discord_.turns(2)
    later = fake.bot_messages(thread.id)[-1]
    assert later.id != first.id and not LINK.search(later.embed_text)
