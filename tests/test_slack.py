"""The Slack adapter end to end: real slack-bolt ↔ a fake Slack, real loop server and CLI.

What a person would see is read back from the fake: the final text of every
message in the thread, the buttons, the private answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from adapters.slack import SlackAdapter, SlackSettings
from adapters.slack.settings import DEFAULT_PART_LIMIT
from bridge.client import LoopClient
from tests.fakes.slack import FakeSlack, Message
from tests.polling import until

pytestmark = pytest.mark.asyncio(loop_scope="session")

ALICE = "U0ALICE"  # starts threads
BOB = "U0BOB"  # another person, not an admin
BOSS = "U0BOSS"  # an admin
CHANNEL = "C0GENERAL"
MENTION = f"<@{FakeSlack.bot_user_id}>"
FENCE = re.compile(r"^```", re.MULTILINE)


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
            bot_token=FakeSlack.bot_token,
            app_token=FakeSlack.app_token,
            signing_secret=FakeSlack.signing_secret,
            api_url=self.fake.api_url,
            admins=[BOSS],
            http_host="127.0.0.1",
            http_port=0,
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

    async def stop(self, grace: float = 5.0) -> None:
        if self.adapter is not None:
            await self.adapter.stop(grace)
            self.adapter = None
        if self.client is not None:
            await self.client.aclose()
            self.client = None
        self.fake.http_target = None

    async def turns(self, count: int, within: float = 60.0) -> None:
        """Wait until the adapter has finished `count` turns (since it started)."""
        adapter = self.adapter
        assert adapter is not None

        def done() -> bool:
            return sum(r.handled == "turn" for r in adapter.results) >= count and not adapter._tasks

        await until(done, within, f"{count} turns")

    def answer(self, thread_ts: str) -> str:
        return "".join(m.answer for m in self.fake.answer_messages(CHANNEL, thread_ts))


@contextlib.asynccontextmanager
async def running(server: Any, fake: FakeSlack | None = None) -> AsyncIterator[Harness]:
    """A harness on a started fake Slack (a new one unless given); both stop at the end."""
    fake = fake or FakeSlack()
    await fake.start()
    harness = Harness(server, fake, await server.token_for("slackbot"))
    try:
        yield harness
    finally:
        await harness.stop()
        await fake.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def slack(server) -> AsyncIterator[Harness]:
    async with running(server) as harness:
        yield harness


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


async def test_a_background_command_finishing_later_answers_in_the_thread(
    slack: Harness,
) -> None:
    await slack.start(permission_mode="bypassPermissions")
    root = await slack.fake.say(ALICE, f"{MENTION} [[bashbg: sleep 1; echo bg > slack-bg.txt]]")
    await slack.turns(1)
    # (The command may end, and its answer show, before the first answer's last edit.)
    assert slack.fake.answer_messages(CHANNEL, root)[0].answer == "Started in background."
    # No one writes again: the command's end wakes the agent, and its answer shows here.
    await until(lambda: len(slack.fake.answer_messages(CHANNEL, root)) == 2, 30, "a 2nd answer")
    await until(lambda: slack.answer(root).endswith("finished."), 10, "its final text")
    texts = [m.answer for m in slack.fake.answer_messages(CHANNEL, root)]
    assert texts == ["Started in background.", "Background task finished."]
    loop = await loop_of(slack, root)
    assert (slack.server.engine.sandbox.workdir(loop.id) / "slack-bg.txt").read_text() == "bg\n"


async def test_thread_reply_without_mention_and_bots_are_ignored(slack: Harness) -> None:
    await slack.start()
    # Not bound, no mention: nothing happens.
    await slack.fake.say(ALICE, "just chatting")
    root = await slack.fake.say(ALICE, f"{MENTION} first")
    await slack.turns(1)
    # Another bot writing in the bound thread is ignored.
    ts = slack.fake.new_ts()
    await slack.fake.deliver_event(
        {
            "type": "message",
            "subtype": "bot_message",
            "bot_id": "B0OTHER",
            "text": "beep",
            "ts": ts,
            "thread_ts": root,
            "channel": CHANNEL,
            "channel_type": "channel",
        },
        "EvBOT",
    )
    await slack.fake.say(BOB, "second, from someone else", thread_ts=root)
    await slack.turns(2)
    texts = [m.answer for m in slack.fake.answer_messages(CHANNEL, root)]
    assert texts == ["Echo #1: first", "Echo #2: second, from someone else"]
    assert len(slack.server.standin_requests()) >= 2


async def test_direct_message_thread_is_a_loop(slack: Harness) -> None:
    await slack.start()
    dm = "D0ALICE"
    root = await slack.fake.say(ALICE, "hi in private", channel=dm)
    await until(lambda: slack.fake.answer_messages(dm, root), what="a DM answer")
    await slack.turns(1)
    await slack.fake.say(ALICE, "more", channel=dm, thread_ts=root)
    await slack.turns(2)
    texts = [m.answer for m in slack.fake.answer_messages(dm, root)]
    assert texts == ["Echo #1: hi in private", "Echo #2: more"]
    # A DM streams without a recipient.
    start = slack.fake.methods("chat.startStream")[0]
    assert "recipient_user_id" not in start.args


# ---- choices ---------------------------------------------------------------------------


async def choice_message(slack: Harness, root: str) -> Message:
    found = await until(
        lambda: [m for m in slack.fake.choice_messages(CHANNEL, root) if m.has_buttons],
        what="a choice with buttons",
    )
    return found[-1]  # type: ignore[index]


async def test_permission_refused_for_others_then_approved_by_the_starter(slack: Harness) -> None:
    await slack.start()
    root = await slack.fake.say(ALICE, f"{MENTION} [[bash: echo hi > slack-perm.txt]]")
    choice = await choice_message(slack, root)
    assert "slack-perm.txt" in choice.block_text("lb_choice")

    await slack.fake.click(BOB, choice, "lb_allow")
    await until(lambda: slack.fake.ephemerals, what="a private refusal")
    refusal = slack.fake.ephemerals[-1]
    assert refusal["user"] == BOB and "Only the person" in refusal["text"]
    assert slack.fake.thread(CHANNEL, root)[-1].has_buttons  # nothing changed

    await slack.fake.click(ALICE, choice, "lb_allow")
    await slack.turns(1)
    choice = slack.fake.choice_messages(CHANNEL, root)[-1]
    assert not choice.has_buttons
    assert f"Allowed by <@{ALICE}>" in choice.context_text()
    assert slack.answer(root).startswith("Tool ok")
    loop = await loop_of(slack, root)
    assert (slack.server.engine.sandbox.workdir(loop.id) / "slack-perm.txt").exists()
    history = await slack.client.history(loop.id)
    assert history.data[0].choices[0].source == f"slack:{ALICE}"
    assert history.data[0].choices[0].answer == {"allow": True}


async def test_a_click_after_a_restart_continues_the_turn(slack: Harness) -> None:
    await slack.start()
    root = await slack.fake.say(ALICE, f"{MENTION} [[bash: echo r > slack-restart.txt]]")
    choice = await choice_message(slack, root)
    await slack.stop(grace=0)  # the adapter goes away while the turn waits

    await slack.start()  # a new process: no renderer, only the buttons' values
    await slack.fake.click(ALICE, choice, "lb_allow")
    await until(lambda: not choice.has_buttons, what="the outcome")
    assert f"Allowed by <@{ALICE}>" in choice.context_text()
    # The rest of the turn is shown below the choice, not lost with the old process.
    await until(lambda: "Tool ok" in slack.answer(root), what="the rest of the turn")
    await slack.adapter.idle()
    loop = await loop_of(slack, root)
    assert (slack.server.engine.sandbox.workdir(loop.id) / "slack-restart.txt").exists()
    history = await slack.client.history(loop.id)
    assert history.data[0].ended == "done"
    answers = slack.fake.answer_messages(CHANNEL, root)
    assert answers[-1].answer == history.data[0].assistant_text


async def test_admin_denies_and_the_model_is_told(slack: Harness) -> None:
    await slack.start()
    root = await slack.fake.say(ALICE, f"{MENTION} [[bash: echo no > slack-denied.txt]]")
    choice = await choice_message(slack, root)
    await slack.fake.click(BOSS, choice, "lb_deny")
    await slack.turns(1)
    assert f"Denied by <@{BOSS}>" in slack.fake.choice_messages(CHANNEL, root)[-1].context_text()
    assert slack.answer(root).startswith("Tool failed")
    loop = await loop_of(slack, root)
    assert not (slack.server.engine.sandbox.workdir(loop.id) / "slack-denied.txt").exists()


async def test_question_answered_by_button_reaches_the_model(slack: Harness) -> None:
    await slack.start()
    root = await slack.fake.say(ALICE, f"{MENTION} [[ask]]")
    choice = await choice_message(slack, root)
    assert "Which color?" in choice.block_text("lb_choice")
    blue = choice.button("lb_answer_1")
    assert blue["text"]["text"] == "Blue"
    await slack.fake.click(ALICE, choice, "lb_answer_1")
    await slack.turns(1)
    answer = slack.answer(root)
    assert answer.startswith("You chose:") and "Blue" in answer
    outcome = slack.fake.choice_messages(CHANNEL, root)[-1].context_text()
    assert f"<@{ALICE}> chose *Blue*" in outcome


async def test_choice_answered_elsewhere_disables_the_buttons(slack: Harness) -> None:
    await slack.start()
    root = await slack.fake.say(ALICE, f"{MENTION} [[bash: echo api > slack-api.txt]]")
    choice = await choice_message(slack, root)
    loop = await loop_of(slack, root)
    detail = await slack.client.get_loop(loop.id)
    pending = detail.current_turn.pending_choice_id
    await slack.client.answer_choice(loop.id, pending, allow=True, source="api")
    await slack.turns(1)
    choice = slack.fake.choice_messages(CHANNEL, root)[-1]
    assert not choice.has_buttons and "Answered via api" in choice.context_text()


async def test_stop_interrupts_the_turn(slack: Harness) -> None:
    await slack.start()
    root = await slack.fake.say(ALICE, f"{MENTION} [[slow: 8]]")

    def stop_button() -> Message | None:
        for message in slack.fake.bot_messages(CHANNEL, root):
            if any(b.get("block_id") == "lb_controls" for b in message.blocks):
                return message
        return None

    message = await until(stop_button, what="a Stop button")
    await until(lambda: slack.answer(root), what="some streamed text")
    await slack.fake.click(BOB, message, "lb_stop")  # not allowed: nothing happens
    await until(lambda: slack.fake.ephemerals, what="a private refusal")
    await slack.fake.click(ALICE, message, "lb_stop")
    await slack.turns(1, within=20)
    loop = await loop_of(slack, root)
    history = await slack.client.history(loop.id)
    assert history.data[0].ended == "interrupted"
    shown = "\n".join(m.context_text() for m in slack.fake.bot_messages(CHANNEL, root))
    assert "Stopped." in shown
    assert not any(m.has_buttons for m in slack.fake.bot_messages(CHANNEL, root))
    # What was streamed before the stop stays complete.
    assert slack.answer(root) == history.data[0].assistant_text


# ---- long answers, limits, redelivery, restarts ------------------------------------------


def unsplit(messages: list[str], whole: str) -> None:
    """Check that `messages` are `whole`, split, with cut code blocks closed and reopened.

    Whitespace at the cuts is not compared (Slack trims it); every other character is.
    """
    expected = "".join(whole.split())
    position = 0
    for index, text in enumerate(messages):
        assert len(FENCE.findall(text)) % 2 == 0, f"unbalanced fences in part {index}"
        lines = text.strip().split("\n")
        if index and lines[0].startswith("```") and not expected.startswith("```", position):
            lines = lines[1:]  # a reopened code block (```python on a stream)
        piece = "".join("".join(lines).split())
        if not expected.startswith(piece, position) and piece.endswith("```"):
            piece = piece[:-3]  # a closed one
        assert expected.startswith(piece, position), f"part {index} does not continue the text"
        position += len(piece)
    assert position == len(expected), "the answer is incomplete"


async def test_long_answer_is_split_complete_and_balanced_with_edits(slack: Harness) -> None:
    slack.fake.update_gap = 0.9
    await slack.start(streaming="edit")
    root = await slack.fake.say(ALICE, f"{MENTION} [[long: 450]]")
    await slack.turns(1, within=90)
    loop = await loop_of(slack, root)
    whole = (await slack.client.history(loop.id)).data[0].assistant_text
    assert len(whole) > 10_000 and whole.count("```") >= 10
    parts = [m.answer for m in slack.fake.answer_messages(CHANNEL, root)]
    assert len(parts) >= 2
    unsplit(parts, whole)
    assert all(len(p.encode()) <= DEFAULT_PART_LIMIT for p in parts)
    refused = [c for c in slack.fake.calls if c.error and c.error != "ratelimited"]
    assert refused == []
    # No message was edited faster than once a second, and none is left with buttons.
    for message in slack.fake.bot_messages(CHANNEL, root):
        gaps = [b - a for a, b in zip(message.updates, message.updates[1:], strict=False)]
        assert all(gap >= 0.9 for gap in gaps), gaps
        assert not message.has_buttons
    # Markdown as the model wrote it, for Slack's `markdown` block: no regex conversion.
    assert "```python" in "".join(parts) and "&amp;" not in "".join(parts)


async def test_short_parts_split_complete_and_balanced(slack: Harness) -> None:
    # A small part limit: many cuts, each in or out of a code block, all balanced.
    await slack.start(streaming="edit", part_limit=2900)
    root = await slack.fake.say(ALICE, f"{MENTION} [[long: 450]]")
    await slack.turns(1, within=90)
    loop = await loop_of(slack, root)
    whole = (await slack.client.history(loop.id)).data[0].assistant_text
    parts = [m.answer for m in slack.fake.answer_messages(CHANNEL, root)]
    assert len(parts) >= 4
    unsplit(parts, whole)
    assert all(len(p.encode()) <= 2900 for p in parts)


async def test_long_answer_streams_natively_split_and_balanced(slack: Harness) -> None:
    await slack.start()
    root = await slack.fake.say(ALICE, f"{MENTION} [[long: 450]]")
    await slack.turns(1, within=90)
    loop = await loop_of(slack, root)
    whole = (await slack.client.history(loop.id)).data[0].assistant_text
    parts = [m.answer for m in slack.fake.answer_messages(CHANNEL, root)]
    assert len(parts) >= 2
    unsplit(parts, whole)
    assert [c for c in slack.fake.calls if c.error] == []


async def test_same_event_delivered_twice_runs_one_turn(slack: Harness) -> None:
    await slack.start()
    before = len(slack.server.standin_requests())
    root = await slack.fake.say(ALICE, f"{MENTION} only once", deliveries=2)
    # Four deliveries (app_mention and message, twice each), every one handled.
    await until(
        lambda: len(slack.adapter.results) == 4 and not slack.adapter._tasks,
        what="every delivery handled",
    )
    loop = await loop_of(slack, root)
    history = await slack.client.history(loop.id)
    assert len(history.data) == 1
    assert [m.answer for m in slack.fake.answer_messages(CHANNEL, root)] == ["Echo #1: only once"]
    assert len(slack.server.standin_requests()) - before == 1
    # app_mention and message both arrived (twice each); three were dropped as duplicates.
    assert sum(r.handled == "duplicate" for r in slack.adapter.results) == 3


async def test_restarted_adapter_finds_the_same_loop(slack: Harness) -> None:
    await slack.start()
    root = await slack.fake.say(ALICE, f"{MENTION} before the restart")
    await slack.turns(1)
    first = await loop_of(slack, root)
    await slack.stop()
    await slack.start()
    await slack.fake.say(ALICE, "after the restart", thread_ts=root)
    await slack.turns(1)
    assert (await loop_of(slack, root)).id == first.id
    texts = [m.answer for m in slack.fake.answer_messages(CHANNEL, root)]
    assert texts == ["Echo #1: before the restart", "Echo #2: after the restart"]


async def test_not_allowed_user_cannot_start_a_loop(slack: Harness) -> None:
    await slack.start(users=[ALICE])
    root = await slack.fake.say(BOB, f"{MENTION} let me in")
    await until(lambda: slack.fake.ephemerals, what="a private refusal")
    assert slack.fake.ephemerals[-1]["user"] == BOB
    assert await loop_of(slack, root) is None
    assert slack.fake.bot_messages(CHANNEL, root) == []


# ---- fallbacks and the HTTP mode -------------------------------------------------------


async def test_without_native_streaming_it_posts_and_edits(slack: Harness) -> None:
    slack.fake.native_streaming = False
    await slack.start()
    root = await slack.fake.say(ALICE, f"{MENTION} **bold** and [a link](https://example.com)")
    await slack.turns(1)
    # The answer as the model wrote it, for Slack's `markdown` block; the notification
    # text in mrkdwn (Slack renders no Markdown there).
    assert slack.answer(root) == "Echo #1: **bold** and [a link](https://example.com)"
    [answer] = slack.fake.answer_messages(CHANNEL, root)
    assert answer.text == "Echo #1: *bold* and <https://example.com|a link>"
    assert slack.adapter.native.enabled is False  # not tried again
    root = await slack.fake.say(ALICE, f"{MENTION} second thread")
    await slack.turns(2)
    assert len(slack.fake.methods("chat.startStream")) == 1


async def test_stale_stream_falls_back_to_edits_without_losing_text(slack: Harness) -> None:
    slack.fake.stream_ttl = 0.5
    await slack.start()
    root = await slack.fake.say(ALICE, f"{MENTION} [[slow: 3]]")
    await slack.turns(1)
    loop = await loop_of(slack, root)
    whole = (await slack.client.history(loop.id)).data[0].assistant_text
    assert slack.answer(root).strip() == whole.strip()
    assert any(c.error == "message_not_in_streaming_state" for c in slack.fake.calls)


async def test_http_mode_with_signed_requests(slack: Harness) -> None:
    await slack.start(mode="http")
    root = await slack.fake.say(ALICE, f"{MENTION} over http")
    await slack.turns(1)
    assert slack.answer(root) == "Echo #1: over http"
    assert slack.fake.acks and all(ack == "http 200" for ack in slack.fake.acks)


async def test_rate_limits_are_waited_out_and_the_final_text_arrives(slack: Harness) -> None:
    # A stricter Slack than the adapter's pace: chat.update gets 429s, which are retried.
    slack.fake.update_gap = 1.6
    await slack.start(streaming="edit")
    root = await slack.fake.say(ALICE, f"{MENTION} [[slow: 4]]")
    await slack.turns(1, within=60)
    assert any(c.status == 429 for c in slack.fake.calls)
    loop = await loop_of(slack, root)
    whole = (await slack.client.history(loop.id)).data[0].assistant_text
    assert slack.answer(root) == whole.strip()
    assert not any(m.has_buttons for m in slack.fake.bot_messages(CHANNEL, root))


async def test_loopbridge_slack_command_runs_against_a_remote_server(slack: Harness) -> None:
    import os
    import sys

    env = {
        **os.environ,
        "LOOPBRIDGE_API_URL": slack.server.url,
        "LOOPBRIDGE_API_TOKEN": slack.token,
        "LOOPBRIDGE_SLACK_BOT_TOKEN": FakeSlack.bot_token,
        "LOOPBRIDGE_SLACK_APP_TOKEN": FakeSlack.app_token,
        "LOOPBRIDGE_SLACK_API_URL": slack.fake.api_url,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge.cli",
        "slack",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await slack.fake.wait_connected(30)
        root = await slack.fake.say(ALICE, f"{MENTION} from the command")
        await until(
            lambda: (
                slack.answer(root) == "Echo #1: from the command"
                and not any(m.streaming for m in slack.fake.bot_messages(CHANNEL, root))
            ),
            what="the command's answer",
        )
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 15)


async def test_embedded_adapter_uses_an_in_process_client(slack: Harness) -> None:
    from adapters.slack.runner import start_embedded
    from bridge.server.app import create_app

    app = create_app(slack.server.engine, manage_engine=False)
    env = {
        "LOOPBRIDGE_SLACK_BOT_TOKEN": FakeSlack.bot_token,
        "LOOPBRIDGE_SLACK_APP_TOKEN": FakeSlack.app_token,
        "LOOPBRIDGE_SLACK_API_URL": slack.fake.api_url,
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        adapter = await start_embedded(app, slack.token)
    assert adapter is not None
    try:
        await slack.fake.wait_connected()
        root = await slack.fake.say(ALICE, f"{MENTION} in process")
        await until(lambda: any(r.handled == "turn" for r in adapter.results), what="a turn")
        assert slack.answer(root) == "Echo #1: in process"
    finally:
        await adapter.stop()
        await adapter.client.aclose()


async def test_an_embedded_adapter_that_cannot_start_closes_and_revokes_its_token(
    slack: Harness,
) -> None:
    import socket

    from adapters.slack.runner import start_embedded
    from adapters.startup import PlatformRefused, PlatformUnreachable
    from bridge.server.app import create_app

    accounts = slack.server.engine.accounts
    app = create_app(slack.server.engine, manage_engine=False)
    await accounts.ensure_user("slack")
    with socket.socket() as closed:  # a port where nothing listens
        closed.bind(("127.0.0.1", 0))
        unused_port = closed.getsockname()[1]

    async def live_tokens() -> set[str]:
        return {info.token_id for info in await accounts.list_tokens("slack")}

    cases = (
        # Slack refuses the bot token: trying again cannot help, the token goes.
        ("xoxb-revoked", slack.fake.api_url, PlatformRefused, False),
        # Slack cannot be reached: the server tries again later with the same token.
        (FakeSlack.bot_token, f"http://127.0.0.1:{unused_port}/api/", PlatformUnreachable, True),
    )
    for bot_token, api_url, error, kept in cases:
        info, token = await accounts.create_token("slack", "embedded, for this test")
        env = {
            "LOOPBRIDGE_SLACK_BOT_TOKEN": bot_token,
            "LOOPBRIDGE_SLACK_APP_TOKEN": FakeSlack.app_token,
            "LOOPBRIDGE_SLACK_API_URL": api_url,
        }
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            with pytest.raises(error):
                await start_embedded(
                    app, token, revoke=lambda info=info: accounts.revoke_token(info.token_id)
                )
        assert (info.token_id in await live_tokens()) is kept, error


async def test_a_message_sent_while_busy_waits_its_turn_in_order(slack: Harness) -> None:
    await slack.start(streaming="edit")
    root = await slack.fake.say(ALICE, f"{MENTION} [[slow: 2]]")
    await until(lambda: slack.answer(root), what="the first answer streaming")
    await slack.fake.say(ALICE, "next", thread_ts=root)
    await until(
        lambda: any(
            "queued behind 1 message" in m.context_text()
            for m in slack.fake.bot_messages(CHANNEL, root)
        ),
        what="a queued note",
    )
    await slack.turns(2)
    texts = [m.answer for m in slack.fake.answer_messages(CHANNEL, root)]
    assert texts[0].startswith("slow 1/10.") and texts[0].endswith("slow 10/10.")
    assert texts[1] == "Echo #2: next"
    assert all("queued" not in m.context_text() for m in slack.fake.bot_messages(CHANNEL, root))


# ---- first words -----------------------------------------------------------------------

# From the model's first delta to the first words in the thread. The aim is 100 ms (see
# bench/bench_firstwords.py); this bound holds on a loaded machine, and the renderer that
# held the first text for the edit interval took ~1 s on a warm turn.
FIRST_WORDS_WITHIN = 0.5


def first_shown(fake: FakeSlack, since: float, words: str) -> float | None:
    """When a call that shows `words` reached the fake (since `since`)."""
    for call in fake.calls:
        if call.at >= since and call.status == 200 and words in json.dumps(call.args):
            return call.at
    return None


@pytest.mark.parametrize("streaming", ["native", "edit"])
async def test_first_words_show_as_soon_as_the_model_sends_them(
    slack: Harness, streaming: str
) -> None:
    await slack.start(streaming=streaming)
    standin = slack.server.standin
    lags: list[float] = []
    root = None
    for turn in (1, 2):  # cold (a new loop's agent starts), then warm
        sent = len(standin.first_deltas)
        since = time.monotonic()
        if root is None:
            root = await slack.fake.say(ALICE, f"{MENTION} [[slow: 2]]")
        else:
            await slack.fake.say(ALICE, "[[slow: 2]]", thread_ts=root)
        await until(lambda n=sent: len(standin.first_deltas) > n, 30, "the model's first delta")
        shown = await until(
            lambda s=since: first_shown(slack.fake, s, "slow 1/10."), 10, "the first words"
        )
        lags.append(shown - standin.first_deltas[sent])
        await slack.turns(turn)
    assert all(lag < FIRST_WORDS_WITHIN for lag in lags), lags
    assert not [c for c in slack.fake.calls if c.status == 429]
