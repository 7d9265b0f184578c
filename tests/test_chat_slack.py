"""Work from a Slack thread (issue 10): routing, thread context, who said what, files in
and out. Real slack-bolt against the fake Slack, the real server, CLI and stand-in."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.chat_world import (
    SHOW_BRANCH,
    SLACK_APP_CHANNEL,
    digest,
    png,
    routed_server,
    user_texts,
)
from tests.fakes.slack import FakeSlack
from tests.polling import until
from tests.test_slack import ALICE, BOB, CHANNEL, MENTION, Harness, loop_of, running

pytestmark = pytest.mark.asyncio(loop_scope="session")

APP = SLACK_APP_CHANNEL
NAMES = {ALICE: "Alice Smith", BOB: "Bob Jones"}


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def server(standin, tmp_path_factory):  # type: ignore[no-untyped-def]
    async for routed in routed_server(standin, tmp_path_factory.mktemp("chat-slack")):
        yield routed


@pytest_asyncio.fixture(loop_scope="session")
async def slack(server) -> AsyncIterator[Harness]:  # type: ignore[no-untyped-def]
    fake = FakeSlack()
    fake.people.update(NAMES)
    async with running(server, fake) as harness:
        yield harness


def answer(slack: Harness, channel: str, root: str) -> str:
    return "".join(m.answer for m in slack.fake.answer_messages(channel, root))


def notes(slack: Harness, channel: str, root: str) -> list[str]:
    """The adapter's plain notes in a thread (routing, files)."""
    return [
        m.text
        for m in slack.fake.bot_messages(channel, root)
        if any(b.get("type") == "markdown" for b in m.blocks)
    ]


# ---- routing ---------------------------------------------------------------------------


async def test_the_channel_defaults_pick_the_repo_and_branch(slack: Harness) -> None:
    await slack.start()
    root = await slack.fake.say(ALICE, f"{MENTION} {SHOW_BRANCH}", channel=APP)
    await slack.turns(1, within=120)
    loop = await loop_of(slack, root, APP)
    assert loop is not None and loop.repo == "app" and loop.branch == "release"
    assert "release\nrelease" in answer(slack, APP, root)
    # The thread's first reply says what the loop works with.
    first = slack.fake.bot_messages(APP, root)[0]
    assert first.text == "Working with repo `app` on `release` · mode `bypassPermissions`"


async def test_an_inline_option_overrides_the_channel(slack: Harness) -> None:
    await slack.start()
    root = await slack.fake.say(
        ALICE, f"{MENTION} repo=plain branch=fix-login {SHOW_BRANCH}", channel=APP
    )
    await slack.turns(1, within=120)
    loop = await loop_of(slack, root, APP)
    assert loop is not None and loop.repo == "plain" and loop.branch == "fix-login"
    # A new branch made from the remote's default (main); the options are not sent on.
    assert "fix-login\nmain" in answer(slack, APP, root)
    assert "repo=plain" not in user_texts(slack.server)


async def test_an_unknown_repo_is_answered_with_the_known_ones_and_no_loop(
    slack: Harness,
) -> None:
    adapter = await slack.start()
    root = await slack.fake.say(ALICE, f"{MENTION} repo=nope fix it", channel=APP)
    await until(lambda: any(r.handled == "no_loop" for r in adapter.results), 30, "a refusal")
    (said,) = notes(slack, APP, root)
    assert "no repo named 'nope'" in said and "known: app, plain" in said
    assert await loop_of(slack, root, APP) is None
    # An option that is not one: also refused, naming the known ones.
    other = await slack.fake.say(ALICE, f"{MENTION} colour=red fix it", channel=APP)
    await until(lambda: notes(slack, APP, other), 30, "a second refusal")
    assert "`colour=` is not an option" in notes(slack, APP, other)[0]
    assert await loop_of(slack, other, APP) is None


# ---- who said what, and what was said before ------------------------------------------


async def test_a_mention_mid_thread_brings_the_earlier_messages_bounded(
    slack: Harness,
) -> None:
    await slack.start()
    root = await slack.fake.say(ALICE, "the login page is broken since Monday")
    for n in range(55):
        await slack.fake.say(BOB, f"safari note {n}", thread_ts=root)
    slack.fake.other_bot_says(
        CHANNEL,
        root,
        [{"type": "section", "text": {"type": "mrkdwn", "text": "CI failed on build 42"}}],
        name="ci-bot",
    )
    before = len(slack.fake.methods("conversations.replies"))
    await slack.fake.say(ALICE, f"{MENTION} [[think]] can you look?", thread_ts=root)
    await slack.turns(1)
    # One history call for the mention, never one per message.
    assert len(slack.fake.methods("conversations.replies")) == before + 1
    seen = user_texts(slack.server, "can you look?")
    assert "[Alice Smith (slack:U0ALICE)]: the login page is broken since Monday" in seen
    assert "[Bob Jones (slack:U0BOB)]: safari note 54" in seen
    assert "[ci-bot (slack:BCI-BOT, a bot)]: CI failed on build 42" in seen
    # Root + 49 newest of 56 earlier messages: 7 left out, and said so.
    assert "safari note 6\n" not in seen and "safari note 7\n" in seen
    assert "7 older messages left out" in seen
    # Names come from users.info, once a person.
    bob_lookups = [c for c in slack.fake.methods("users.info") if c.args.get("user") == BOB]
    assert len(bob_lookups) == 1


async def test_two_people_in_one_thread_are_told_apart(slack: Harness) -> None:
    await slack.start()
    root = await slack.fake.say(ALICE, f"{MENTION} [[think]] first")
    await slack.turns(1)
    await slack.fake.say(BOB, "[[think]] second", thread_ts=root)
    await slack.turns(2)
    seen = user_texts(slack.server)
    assert "[from Alice Smith (slack:U0ALICE)]\n[[think]] first" in seen
    assert "[from Bob Jones (slack:U0BOB)]\n[[think]] second" in seen
    loop = await loop_of(slack, root)
    assert loop is not None and slack.client is not None
    history = (await slack.client.history(loop.id)).data
    assert [item.author.name for item in history if item.author] == ["Alice Smith", "Bob Jones"]


# ---- files -----------------------------------------------------------------------------


async def test_a_pasted_image_reaches_the_model(slack: Harness) -> None:
    await slack.start()
    image = png(3, 2)
    root = await slack.fake.say(
        ALICE, f"{MENTION} [[image]]", files=[("screen shot.png", image, "image/png")]
    )
    await slack.turns(1)
    assert f"image/png {len(image)} bytes sha256={digest(image)}" in answer(slack, CHANNEL, root)
    loop = await loop_of(slack, root)
    assert loop is not None and slack.client is not None
    async with slack.client.download_file(loop.id, "uploads/screen_shot.png") as download:
        assert await download.read() == image


async def test_a_shared_file_appears_in_the_thread_with_its_caption(slack: Harness) -> None:
    await slack.start(permission_mode="bypassPermissions")
    root = await slack.fake.say(ALICE, f"{MENTION} [[write: out/report.txt :: weekly numbers]]")
    await slack.turns(1)
    await slack.fake.say(ALICE, "[[share: out/report.txt :: the weekly report]]", thread_ts=root)
    await slack.turns(2)
    await until(lambda: slack.fake.shared_files(CHANNEL, root), 30, "a shared file")
    ((file, caption),) = slack.fake.shared_files(CHANNEL, root)
    assert file["name"] == "report.txt" and file["content"].strip() == b"weekly numbers"
    assert caption == "the weekly report"
    assert slack.fake.methods("files.getUploadURLExternal")
    assert slack.fake.methods("files.completeUploadExternal")


async def test_an_over_size_shared_file_gets_a_message(slack: Harness) -> None:
    await slack.start(permission_mode="bypassPermissions", file_limit=8)
    root = await slack.fake.say(ALICE, f"{MENTION} [[write: big.txt :: more than eight bytes]]")
    await slack.turns(1)
    await slack.fake.say(ALICE, "[[share: big.txt :: too big]]", thread_ts=root)
    await slack.turns(2)
    loop = await loop_of(slack, root)
    assert loop is not None
    await until(lambda: notes(slack, CHANNEL, root), 30, "a note")
    (said,) = notes(slack, CHANNEL, root)
    assert "`big.txt`" in said and "too large to post here" in said
    assert f"GET /api/v1/loops/{loop.id}/files/big.txt" in said
    assert not slack.fake.shared_files(CHANNEL, root)


async def test_a_file_slack_will_not_hand_out_is_named_not_dropped(slack: Harness) -> None:
    await slack.start()
    fake = slack.fake
    root = await fake.say(
        ALICE, f"{MENTION} [[think]] see attached", files=[("notes.txt", b"hello", "text/plain")]
    )
    await slack.turns(1)
    loop = await loop_of(slack, root)
    assert loop is not None and slack.client is not None
    listed = await slack.client.list_files(loop.id, "uploads")
    assert [item.path for item in listed.data] == ["uploads/notes.txt"]
    # A file Slack lists but does not hand out (its URL gives the sign-in page), and one
    # over the 25 MiB a loop takes, are named in the thread; the message still goes.
    secret = fake.add_file("secret.pdf", b"%PDF", "application/pdf")
    secret["url_private_download"] = f"{fake.url}/signin"
    huge = fake.add_file("huge.zip", b"PK", "application/zip")
    huge["size"] = 30 * 1024 * 1024
    ts = fake.new_ts()
    event = {
        "type": "message",
        "user": ALICE,
        "text": f"{MENTION} [[think]] and this",
        "ts": ts,
        "channel": CHANNEL,
        "team": fake.team_id,
        "channel_type": "channel",
        "subtype": "file_share",
        "files": [{k: v for k, v in f.items() if k != "content"} for f in (secret, huge)],
    }
    await fake.deliver_event(event, "EvHAND0001")
    await slack.turns(2)
    first, second = notes(slack, CHANNEL, ts)
    assert "`secret.pdf` was not sent" in first and "no access" in first
    assert "`huge.zip` (30.0 MB) was not sent" in second
