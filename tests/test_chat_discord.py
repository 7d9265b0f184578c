"""Work from a Discord thread (issue 10): routing, thread context, who said what, files in
and out. Real discord.py against the fake Discord, the real server, CLI and stand-in."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.chat_world import (
    DISCORD_APP_CHANNEL,
    SHOW_BRANCH,
    digest,
    png,
    routed_server,
    user_texts,
)
from tests.fakes.discord import TEXT_CHANNEL, Channel, FakeDiscord
from tests.polling import until
from tests.test_discord import Harness, running

pytestmark = pytest.mark.asyncio(loop_scope="session")

GENERAL = FakeDiscord.general_id
APP = DISCORD_APP_CHANNEL


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def server(standin, tmp_path_factory):  # type: ignore[no-untyped-def]
    async for routed in routed_server(standin, tmp_path_factory.mktemp("chat-discord")):
        yield routed


@pytest_asyncio.fixture(loop_scope="session")
async def chat(server) -> AsyncIterator[Harness]:  # type: ignore[no-untyped-def]
    fake = FakeDiscord()
    # The channel the settings file routes to the `app` repo.
    fake.channels[APP] = Channel(APP, TEXT_CHANNEL, "app", fake.guild_id)
    async with running(server, fake) as harness:
        yield harness


def texts(chat: Harness, channel: str) -> list[str]:
    return [m.content for m in chat.fake.bot_messages(channel)]


# ---- routing ---------------------------------------------------------------------------


async def test_the_channel_defaults_pick_the_repo_and_branch(chat: Harness) -> None:
    await chat.start()
    asked = await chat.fake.say(chat.alice, SHOW_BRANCH, channel=APP, mention=True)
    await chat.turns(1, within=120)
    loop = await chat.loop_of(asked.id, APP)
    assert loop is not None and loop.repo == "app" and loop.branch == "release"
    said = texts(chat, asked.id)
    assert said[0] == "Working with repo `app` on `release` · mode `bypassPermissions`"
    assert "release\nrelease" in chat.answer(asked.id)


async def test_an_inline_option_overrides_the_channel(chat: Harness) -> None:
    await chat.start()
    asked = await chat.fake.say(
        chat.alice, f"repo=plain branch=release {SHOW_BRANCH}", channel=APP, mention=True
    )
    await chat.turns(1, within=120)
    loop = await chat.loop_of(asked.id, APP)
    assert loop is not None and loop.repo == "plain" and loop.branch == "release"
    assert "release\nrelease" in chat.answer(asked.id)


async def test_an_unknown_repo_is_answered_in_the_thread_and_no_loop(chat: Harness) -> None:
    adapter = await chat.start()
    asked = await chat.fake.say(chat.alice, "repo=nope fix it", channel=APP, mention=True)
    await until(lambda: any(r.handled == "no_loop" for r in adapter.results), 30, "a refusal")
    (said,) = texts(chat, asked.id)  # in the thread started on the message
    assert "no repo named 'nope'" in said and "known: app, plain" in said
    assert await chat.loop_of(asked.id, APP) is None


async def test_loop_new_takes_the_same_options(chat: Harness) -> None:
    await chat.start()
    await chat.fake.slash(chat.alice, APP, "loop", "new", title="fix", repo="nope")
    await until(lambda: chat.fake.ephemerals_for(chat.alice), 30, "an answer")
    assert "no repo named 'nope'" in chat.fake.ephemerals_for(chat.alice)[-1]
    assert not chat.fake.threads_of(APP)
    await chat.fake.slash(chat.alice, APP, "loop", "new", title="fix", branch="fix-login")
    await until(lambda: len(chat.fake.ephemerals_for(chat.alice)) == 2, 30, "a 2nd answer")
    (thread,) = chat.fake.threads_of(APP)
    loop = await chat.loop_of(thread.id, APP)
    assert loop is not None and loop.repo == "app" and loop.branch == "fix-login"
    assert "repo `app` on `fix-login`" in texts(chat, thread.id)[0]


# ---- who said what, and what was said before ------------------------------------------


async def test_a_mention_mid_thread_brings_the_earlier_messages_bounded(
    chat: Harness,
) -> None:
    fake = chat.fake
    await chat.start()
    thread = fake.thread_by(chat.alice, GENERAL, "login bug")
    await fake.say(chat.alice, "the login page is broken since Monday", channel=thread.id)
    for n in range(52):
        await fake.say(chat.bob, f"safari note {n}", channel=thread.id)
    fake.other_bot_says(thread.id, [{"title": "CI", "description": "build 42 failed"}], "ci-bot")
    await fake.say(chat.alice, "[[think]] can you look?", channel=thread.id, mention=True)
    await chat.turns(1)
    history_reads = [
        c for c in fake.calls if c.method == "GET" and c.path == f"/channels/{thread.id}/messages"
    ]
    assert len(history_reads) == 1
    seen = user_texts(chat.server, "can you look?")
    alice, bob = chat.alice.id, chat.bob.id
    assert f"[alice (discord:{alice})]: the login page is broken since Monday" in seen
    assert f"[bob (discord:{bob})]: safari note 51" in seen
    assert "a bot)]: CI\nbuild 42 failed" in seen
    # Root + the 49 newest of 54 earlier messages: 4 left out, and said so.
    assert "safari note 3\n" not in seen and "safari note 4\n" in seen
    assert "4 older messages left out" in seen


async def test_two_people_in_one_thread_are_told_apart(chat: Harness) -> None:
    await chat.start()
    asked = await chat.fake.say(chat.alice, "[[think]] first", mention=True)
    await chat.turns(1)
    await chat.fake.say(chat.bob, "[[think]] second", channel=asked.id)
    await chat.turns(2)
    seen = user_texts(chat.server)
    assert f"[from alice (discord:{chat.alice.id})]\n[[think]] first" in seen
    assert f"[from bob (discord:{chat.bob.id})]\n[[think]] second" in seen


# ---- files -----------------------------------------------------------------------------


async def test_a_pasted_image_reaches_the_model(chat: Harness) -> None:
    await chat.start()
    image = png(4, 3)
    asked = await chat.fake.say(chat.alice, "[[image]]", mention=True, files=[("shot.png", image)])
    await chat.turns(1)
    assert f"image/png {len(image)} bytes sha256={digest(image)}" in chat.answer(asked.id)


async def test_a_shared_file_appears_in_the_thread_with_its_caption(chat: Harness) -> None:
    await chat.start(permission_mode="bypassPermissions")
    asked = await chat.fake.say(
        chat.alice, "[[write: out/report.txt :: weekly numbers]]", mention=True
    )
    await chat.turns(1)
    await chat.fake.say(
        chat.alice, "[[share: out/report.txt :: the weekly report]]", channel=asked.id
    )
    await chat.turns(2)
    await until(lambda: chat.fake.shared_files(asked.id), 30, "a shared file")
    ((name, content, caption),) = chat.fake.shared_files(asked.id)
    assert name == "report.txt" and content.strip() == b"weekly numbers"
    assert caption == "the weekly report"


async def test_an_over_size_shared_file_gets_a_message(chat: Harness) -> None:
    await chat.start(permission_mode="bypassPermissions")
    # 11 MB: over the 10 MiB a server without boosts takes.
    asked = await chat.fake.say(
        chat.alice, "[[bash: head -c 11000000 /dev/zero > big.bin && echo made]]", mention=True
    )
    await chat.turns(1)
    await chat.fake.say(chat.alice, "[[share: big.bin :: all of it]]", channel=asked.id)
    await chat.turns(2)
    loop = await chat.loop_of(asked.id)
    assert loop is not None
    await until(lambda: any("too large" in t for t in texts(chat, asked.id)), 30, "a note")
    (said,) = [t for t in texts(chat, asked.id) if "too large" in t]
    assert "`big.bin` (10.5 MB)" in said
    assert f"GET /api/v1/loops/{loop.id}/files/big.bin" in said
    assert not chat.fake.shared_files(asked.id)
