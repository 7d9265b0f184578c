"""The Discord adapter end to end: real discord.py ↔ a fake Discord, real loop server and CLI.

What a person would see is read back from the fake: the final content of every
message in a thread, its buttons, and the answers only one person saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import discord
import pytest
import pytest_asyncio
from discord.gateway import DiscordWebSocket

from adapters.actions import Action
from adapters.discord import DiscordAdapter, DiscordSettings
from adapters.discord.access import PERMISSIONS
from adapters.views import choice_view
from bridge.client import LoopClient
from tests.fakes.discord import FakeDiscord, Message
from tests.polling import until

pytestmark = pytest.mark.asyncio(loop_scope="session")

ADMIN_ROLE = "1500000000000000001"
FENCE = re.compile(r"^```", re.MULTILINE)
CHOICE_VERBS = ("allow", "deny", "answer", "submit")


def is_choice(message: Message) -> bool:
    """A message that asked a person to decide (it keeps that kind after the outcome edit)."""
    return any(
        (action := Action.decode(custom_id)) is not None and action.verb in CHOICE_VERBS
        for custom_id in message.ever
    )


class Harness:
    """A fake Discord with its people, a Loop API client for the bot's user, and the adapter."""

    def __init__(self, server, fake: FakeDiscord, token: str) -> None:
        self.server = server
        self.fake = fake
        self.token = token
        self.alice = fake.person("2000000000000000001", "alice")
        self.bob = fake.person("2000000000000000002", "bob")
        self.boss = fake.person("2000000000000000003", "boss", roles=(ADMIN_ROLE,))
        self.client: LoopClient | None = None
        self.adapter: DiscordAdapter | None = None

    def settings(self, **overrides) -> DiscordSettings:
        values = dict(
            token=FakeDiscord.token,
            api_url=self.fake.api_url,
            gateway_url=self.fake.gateway_url,
            admins=[ADMIN_ROLE],
            command_guilds=[FakeDiscord.guild_id],
            guild_ready_timeout=0.1,
        )
        return DiscordSettings(**(values | overrides))

    async def start(self, **overrides) -> DiscordAdapter:
        self.client = LoopClient(self.server.url, self.token)
        self.adapter = DiscordAdapter(self.settings(**overrides), self.client)
        await self.adapter.start()
        await self.fake.wait_ready()
        return self.adapter

    async def stop(self, grace: float = 5.0) -> None:
        if self.adapter is not None:
            await self.adapter.stop(grace)
            self.adapter = None
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    async def turns(self, count: int, within: float = 60.0) -> None:
        """Wait until the adapter has finished `count` turns (since it started)."""
        adapter = self.adapter
        assert adapter is not None

        def done() -> bool:
            finished = sum(r.handled == "turn" for r in adapter.results)
            return finished >= count and not adapter._tasks

        await until(done, within, f"{count} turns")

    def answers(self, channel: str) -> list[str]:
        """The text of each answer message in a channel, files included (choices left out)."""
        return [m.text for m in self.fake.bot_messages(channel) if not is_choice(m)]

    def answer(self, channel: str) -> str:
        return "".join(self.answers(channel))

    def choices(self, channel: str) -> list[Message]:
        return [m for m in self.fake.bot_messages(channel) if is_choice(m)]

    async def loop_of(self, thread: str, channel: str = FakeDiscord.general_id):
        assert self.client is not None
        key = f"discord:{FakeDiscord.guild_id}:{channel}:{thread}"
        return await self.client.find_loop({"binding": key})


@contextlib.asynccontextmanager
async def running(server: Any, fake: FakeDiscord | None = None) -> AsyncIterator[Harness]:
    """A harness on a started fake Discord (a new one unless given); at the end both
    stop and discord.py's module-wide URLs, which the fake points elsewhere, come back."""
    saved = discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    fake = fake or FakeDiscord()
    await fake.start()
    harness = Harness(server, fake, await server.token_for("discordbot"))
    try:
        yield harness
    finally:
        await harness.stop()
        await fake.stop()
        discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = saved


@pytest_asyncio.fixture(loop_scope="session")
async def discord_(server) -> AsyncIterator[Harness]:
    async with running(server) as harness:
        yield harness


# ---- a mention becomes a thread and a loop; the thread continues it ----------------------


async def test_mention_starts_a_thread_and_a_loop_and_the_reply_streams(discord_: Harness) -> None:
    fake = discord_.fake
    await discord_.start()
    asked = await fake.say(discord_.alice, "hello there", mention=True)
    await discord_.turns(1)
    thread = fake.channels[asked.id]  # Discord gives the thread its message's id
    assert thread.parent_id == fake.general_id and thread.name == "hello there"
    loop = await discord_.loop_of(thread.id)
    assert loop is not None and loop.title == "hello there"
    assert loop.metadata["started_by"] == discord_.alice.id
    assert discord_.answers(thread.id) == ["Echo #1: hello there"]
    reply = fake.bot_messages(thread.id)[0]
    assert not reply.has_components and not reply.embeds  # final: no Stop, no status
    # It streamed: the message was posted at once, before the text was complete.
    assert reply.shown[0][1] != reply.content

    await fake.say(discord_.alice, "and again", channel=thread.id)
    await discord_.turns(2)
    assert (await discord_.loop_of(thread.id)).id == loop.id
    assert discord_.answers(thread.id) == ["Echo #1: hello there", "Echo #2: and again"]
    assert fake.rate_limited() == [] and fake.refused() == []
    assert fake.intents & (1 << 15), "the message content intent"


async def test_a_background_command_finishing_later_answers_in_the_thread(
    discord_: Harness,
) -> None:
    fake = discord_.fake
    await discord_.start(permission_mode="bypassPermissions")
    asked = await fake.say(discord_.alice, "[[bashbg: sleep 1; echo bg > d-bg.txt]]", mention=True)
    await discord_.turns(1)
    # (The command may end, and its answer show, before the first answer's last edit.)
    assert discord_.answers(asked.id)[0] == "Started in background."
    # No one writes again: the command's end wakes the agent, and its answer shows here.
    await until(lambda: len(discord_.answers(asked.id)) == 2, 30, "a second answer")
    # Final once its Stop button is gone.
    await until(lambda: not fake.bot_messages(asked.id)[-1].has_components, 10, "its last edit")
    assert discord_.answers(asked.id) == ["Started in background.", "Background task finished."]
    assert len(fake.threads_of(fake.general_id)) == 1 and fake.refused() == []


async def test_bots_and_stray_messages_are_ignored_and_a_dm_is_one_loop(discord_: Harness) -> None:
    fake = discord_.fake
    await discord_.start()
    await fake.say(discord_.alice, "just chatting")  # no mention, no bound thread
    asked = await fake.say(discord_.alice, "first", mention=True)
    await discord_.turns(1)
    robot = fake.person("2000000000000000009", "robot")
    robot.bot = True
    await fake.say(robot, "beep", channel=asked.id)  # another bot in the bound thread
    await fake.say(discord_.bob, "second, from someone else", channel=asked.id)
    await discord_.turns(2)
    assert discord_.answers(asked.id) == ["Echo #1: first", "Echo #2: second, from someone else"]
    assert [t.id for t in fake.threads_of(fake.general_id)] == [asked.id]

    dm = fake.dm_with(discord_.alice)
    await fake.say(discord_.alice, "hi in private", channel=dm.id)
    await discord_.turns(3)
    await fake.say(discord_.alice, "more", channel=dm.id)
    await discord_.turns(4)
    assert discord_.answers(dm.id) == ["Echo #1: hi in private", "Echo #2: more"]
    key = f"discord:@me:{dm.id}:{dm.id}"
    assert (await discord_.client.find_loop({"binding": key})) is not None
    # The bot's own messages came back over the gateway too, and started nothing.
    assert len(discord_.adapter.results) == 4


async def test_a_mention_in_a_thread_people_opened_binds_that_thread(discord_: Harness) -> None:
    fake = discord_.fake
    await discord_.start()
    thread = fake.thread_by(discord_.bob, fake.general_id, "bob's thread")
    await fake.say(discord_.bob, "not for the bot", channel=thread.id)
    await fake.say(discord_.bob, "now for the bot", channel=thread.id, mention=True)
    await discord_.turns(1)
    (answer,) = discord_.answers(thread.id)
    # The thread's earlier message came along (thread context, docs/chat.md).
    assert answer.startswith("Echo #1: Earlier in this thread") and "not for the bot" in answer
    assert answer.endswith("now for the bot")
    assert (await discord_.loop_of(thread.id)).metadata["started_by"] == discord_.bob.id
    assert fake.threads_of(fake.general_id) == [thread]  # no thread in a thread
    # discord.py had not seen the thread: the adapter looked it up to find its channel.
    assert any(c.method == "GET" and c.path == f"/channels/{thread.id}" for c in fake.calls)


async def test_a_bound_channel_is_one_loop_without_mentions(discord_: Harness) -> None:
    fake = discord_.fake
    dev = fake.text_channel("dev")
    await discord_.start(bound_channels=[dev.id])
    await fake.say(discord_.alice, "no mention needed", channel=dev.id)
    await discord_.turns(1)
    await fake.say(discord_.bob, "still the same loop", channel=dev.id)
    await discord_.turns(2)
    assert discord_.answers(dev.id) == [
        "Echo #1: no mention needed",
        "Echo #2: still the same loop",
    ]
    assert fake.threads_of(dev.id) == []
    assert (await discord_.loop_of(dev.id, channel=dev.id)) is not None


async def test_someone_not_allowed_cannot_start_a_loop(discord_: Harness) -> None:
    fake = discord_.fake
    await discord_.start(users=[discord_.alice.id])
    asked = await fake.say(discord_.bob, "let me in", mention=True)
    await until(lambda: fake.reactions, what="a refusal")
    assert fake.reactions == [(asked.id, "🚫")]
    assert fake.threads_of(fake.general_id) == []
    assert await discord_.loop_of(asked.id) is None


# ---- choices ---------------------------------------------------------------------------


async def pending_choice(discord_: Harness, channel: str) -> Message:
    found = await until(
        lambda: [m for m in discord_.choices(channel) if m.has_components],
        what="a choice with controls",
    )
    return found[-1]  # type: ignore[index]


async def test_permission_refused_for_others_then_approved_by_the_starter(
    discord_: Harness,
) -> None:
    fake = discord_.fake
    await discord_.start()
    asked = await fake.say(discord_.alice, "[[bash: echo hi > discord-perm.txt]]", mention=True)
    choice = await pending_choice(discord_, asked.id)
    assert "discord-perm.txt" in choice.content
    assert [b["label"] for b in choice.components[0]["components"]] == ["Allow", "Deny"]

    await fake.click(discord_.bob, choice, choice.find("Allow")["custom_id"])
    await until(lambda: fake.ephemerals_for(discord_.bob), what="a private refusal")
    assert "Only the person" in fake.ephemerals_for(discord_.bob)[0]
    assert choice.has_components  # nothing changed

    await fake.click(discord_.alice, choice, choice.find("Allow")["custom_id"])
    await discord_.turns(1)
    assert not choice.has_components
    assert f"Allowed by <@{discord_.alice.id}>" in choice.content
    assert discord_.answer(asked.id).startswith("Tool ok")
    loop = await discord_.loop_of(asked.id)
    assert (discord_.server.engine.sandbox.workdir(loop.id) / "discord-perm.txt").exists()
    history = await discord_.client.history(loop.id)
    assert history.data[0].choices[0].source == f"discord:{discord_.alice.id}"
    assert history.data[0].choices[0].answer == {"allow": True}
    # Every interaction was answered in time, once.
    assert all(i.answered_at is not None for i in fake.interactions.values())
    assert fake.refused() == []


async def test_an_admin_by_role_denies_and_the_model_is_told(discord_: Harness) -> None:
    fake = discord_.fake
    await discord_.start()
    asked = await fake.say(discord_.alice, "[[bash: echo no > discord-denied.txt]]", mention=True)
    choice = await pending_choice(discord_, asked.id)
    await fake.click(discord_.boss, choice, choice.find("Deny")["custom_id"])
    await discord_.turns(1)
    assert f"Denied by <@{discord_.boss.id}>" in choice.content
    assert discord_.answer(asked.id).startswith("Tool failed")
    loop = await discord_.loop_of(asked.id)
    assert not (discord_.server.engine.sandbox.workdir(loop.id) / "discord-denied.txt").exists()


async def test_question_answered_by_button(discord_: Harness) -> None:
    fake = discord_.fake
    await discord_.start()
    asked = await fake.say(discord_.alice, "[[ask]]", mention=True)
    choice = await pending_choice(discord_, asked.id)
    assert "Which color?" in choice.content and "cool" in choice.content
    await fake.click(discord_.alice, choice, choice.find("Blue")["custom_id"])
    await discord_.turns(1)
    answer = discord_.answer(asked.id)
    assert answer.startswith("You chose:") and "Blue" in answer
    assert f"<@{discord_.alice.id}> chose **Blue**" in choice.content


async def test_question_answered_by_select(discord_: Harness) -> None:
    fake = discord_.fake
    await discord_.start(option_buttons=0)
    asked = await fake.say(discord_.alice, "[[ask]]", mention=True)
    choice = await pending_choice(discord_, asked.id)
    [menu] = choice.selects()
    assert [o["label"] for o in menu["options"]] == ["Red", "Blue"]
    assert menu["max_values"] == 1
    await fake.pick(discord_.alice, choice, menu["custom_id"], ["Red"])
    await discord_.turns(1)
    answer = discord_.answer(asked.id)
    assert answer.startswith("You chose:") and "Red" in answer
    assert f"<@{discord_.alice.id}> chose **Red**" in choice.content and not choice.selects()


async def test_stop_interrupts_the_turn(discord_: Harness) -> None:
    fake = discord_.fake
    await discord_.start()
    asked = await fake.say(discord_.alice, "[[slow: 8]]", mention=True)

    def streaming() -> Message | None:
        live = [m for m in fake.bot_messages(asked.id) if m.content and m.has_components]
        return live[0] if live else None

    message = await until(streaming, what="streamed text with a Stop button")
    stop = message.find("Stop")["custom_id"]
    await fake.click(discord_.bob, message, stop)  # not allowed: nothing happens
    await until(lambda: fake.ephemerals_for(discord_.bob), what="a private refusal")
    await fake.click(discord_.alice, message, stop)
    await discord_.turns(1, within=20)
    loop = await discord_.loop_of(asked.id)
    history = await discord_.client.history(loop.id)
    assert history.data[0].ended == "interrupted"
    assert "Stopped." in message.embed_text and not message.has_components
    # What was streamed before the stop stays, complete.
    assert discord_.answer(asked.id) == history.data[0].assistant_text


async def test_a_button_clicked_after_a_restart_answers_its_choice(discord_: Harness) -> None:
    fake = discord_.fake
    await discord_.start()
    asked = await fake.say(discord_.alice, "[[bash: echo r > discord-restart.txt]]", mention=True)
    choice = await pending_choice(discord_, asked.id)
    await discord_.stop(grace=0)  # the bot goes away while the turn waits

    await discord_.start()  # a new process: no view, no renderer, only the custom_id
    await fake.click(discord_.alice, choice, choice.find("Allow")["custom_id"])
    await until(lambda: not choice.has_components, what="the outcome")
    assert f"Allowed by <@{discord_.alice.id}>" in choice.content
    # The rest of the turn is shown below the choice, not lost with the old process.
    await until(lambda: "Tool ok" in discord_.answer(asked.id), what="the rest of the turn")
    await discord_.adapter.idle()
    loop = await discord_.loop_of(asked.id)
    assert (discord_.server.engine.sandbox.workdir(loop.id) / "discord-restart.txt").exists()
    history = await discord_.client.history(loop.id)
    assert history.data[0].ended == "done"
    assert discord_.answers(asked.id)[-1] == history.data[0].assistant_text


async def test_several_questions_are_picked_in_menus_then_submitted(discord_: Harness) -> None:
    """Picks are kept in the message itself (no memory in the bot) until Submit sends them all.

    The stand-in model asks one question at a time, so this choice is shown directly
    on a loop's thread, and the decision that Submit makes is read on its way to the API.
    """
    fake = discord_.fake
    adapter = await discord_.start()
    asked = await fake.say(discord_.alice, "set up", mention=True)
    await discord_.turns(1)
    loop = await discord_.loop_of(asked.id)
    view = choice_view(
        loop.id,
        {
            "choice_id": "choice_menus",
            "kind": "question",
            "payload": {
                "questions": [
                    {
                        "id": "q1",
                        "question": "Which color?",
                        "options": [{"label": "Red"}, {"label": "Blue"}],
                    },
                    {
                        "id": "q2",
                        "question": "Which sizes?",
                        "multi_select": True,
                        "options": [{"label": "S"}, {"label": "M"}, {"label": "L"}],
                    },
                ]
            },
        },
    )
    await adapter.surface(int(asked.id)).post_choice(view)
    choice = discord_.choices(asked.id)[-1]
    color, sizes = choice.selects()
    assert sizes["max_values"] == 3 and choice.find("Submit")

    decided: list[tuple[Action, object]] = []
    decide = adapter.conversations.decide

    async def recording(actor, action, answers=None):
        decided.append((action, answers))
        return await decide(actor, action, answers)

    adapter.conversations.decide = recording  # type: ignore[method-assign]
    await fake.pick(discord_.alice, choice, color["custom_id"], ["Blue"])
    await until(
        lambda: any(o.get("default") for o in choice.selects()[0]["options"]),
        what="the pick kept in the message",
    )
    await fake.pick(discord_.alice, choice, sizes["custom_id"], ["S", "L"])
    await until(
        lambda: any(o.get("default") for o in choice.selects()[1]["options"]),
        what="the second pick kept in the message",
    )
    assert decided == []  # a pick alone decides nothing
    await fake.click(discord_.alice, choice, choice.find("Submit")["custom_id"])
    await until(lambda: decided, what="the submitted answers")
    assert decided[0][1] == {"q1": "Blue", "q2": ["S", "L"]}
    # No such choice is pending in the loop: the person is told, the menus go away.
    await until(lambda: fake.ephemerals_for(discord_.alice), what="a private answer")
    await until(lambda: not choice.has_components, what="the menus removed")


# ---- long answers, limits, redelivery -----------------------------------------------------


def fence_free(text: str) -> str:
    """The text without code-fence lines or whitespace: what splitting may not change."""
    kept = [line for line in text.splitlines() if not FENCE.match(line)]
    return "".join("".join(kept).split())


async def test_a_long_answer_arrives_split_complete_and_balanced(discord_: Harness) -> None:
    fake = discord_.fake
    await discord_.start(attach_rest=False)  # every part as a message
    asked = await fake.say(discord_.alice, "[[long: 450]]", mention=True)
    await discord_.turns(1, within=90)
    loop = await discord_.loop_of(asked.id)
    whole = (await discord_.client.history(loop.id)).data[0].assistant_text
    assert len(whole) > 10_000 and whole.count("```") >= 10
    parts = discord_.answers(asked.id)
    assert len(parts) >= 6
    assert all(len(part) <= 2000 for part in parts)
    assert all(len(FENCE.findall(part)) % 2 == 0 for part in parts), "unbalanced fences"
    assert fence_free("".join(parts)) == fence_free(whole)
    # A code block cut by a split goes on in the next part, with its language.
    assert any(part.startswith("```python") for part in parts[1:])
    assert fake.refused() == [] and fake.rate_limited() == []
    messages = fake.bot_messages(asked.id)
    assert not any(m.has_components or m.embeds for m in messages)


async def test_a_burst_too_long_to_post_in_time_ends_in_one_file(discord_: Harness) -> None:
    fake = discord_.fake
    await discord_.start()
    asked = await fake.say(discord_.alice, "[[long: 1500]]", mention=True)
    await discord_.turns(1, within=90)
    loop = await discord_.loop_of(asked.id)
    whole = (await discord_.client.history(loop.id)).data[0].assistant_text
    messages = [m for m in fake.bot_messages(asked.id) if not is_choice(m)]
    # ~22 parts came at once: a few went out as messages, the rest as one file.
    assert len(whole) > 40_000 and len(messages) <= 8
    *posted, last = messages
    assert all(not m.attachments and len(m.content) <= 2000 for m in posted)
    assert [name for _, name, _ in last.attachments] == ["answer.md"]
    assert "rest of the answer is attached" in last.embed_text and not last.has_components
    assert fence_free("".join(m.text for m in messages)) == fence_free(whole)
    assert fake.refused() == []


async def test_rate_limits_are_waited_out_and_nothing_is_lost(discord_: Harness) -> None:
    """A Discord that allows fewer writes than the bot's budget, and says so only by 429s."""
    fake = discord_.fake
    fake.budget, fake.window, fake.announce = 2, 1.0, False
    await discord_.start(attach_rest=False)  # a burst of posts, not one file
    asked = await fake.say(discord_.alice, "[[long: 300]]", mention=True)
    await discord_.turns(1, within=90)
    loop = await discord_.loop_of(asked.id)
    whole = (await discord_.client.history(loop.id)).data[0].assistant_text
    assert fake.rate_limited(), "the fake should have refused a burst"
    assert fake.refused() == []
    assert fence_free(discord_.answer(asked.id)) == fence_free(whole)
    # discord.py retried every 429 itself: the renderer saw no failed call.
    assert discord_.adapter.results[0].stats.failures == 0


async def test_a_duplicated_gateway_event_runs_one_turn(discord_: Harness) -> None:
    fake = discord_.fake
    await discord_.start()
    before = len(discord_.server.standin_requests())
    asked = await fake.say(discord_.alice, "only once", mention=True, deliveries=2)
    await discord_.turns(1)
    await until(
        lambda: len(discord_.adapter.results) == 2 and not discord_.adapter._tasks,
        what="both deliveries handled",
    )
    loop = await discord_.loop_of(asked.id)
    assert len((await discord_.client.history(loop.id)).data) == 1
    assert discord_.answers(asked.id) == ["Echo #1: only once"]
    assert len(discord_.server.standin_requests()) - before == 1
    assert [r.handled for r in discord_.adapter.results].count("duplicate") == 1
    assert len(fake.threads_of(fake.general_id)) == 1


# ---- slash commands ------------------------------------------------------------------------


async def test_slash_commands_new_status_and_stop(discord_: Harness) -> None:
    fake = discord_.fake
    await discord_.start()
    [registered] = fake.commands[fake.guild_id]
    assert registered["name"] == "loop"
    assert {o["name"] for o in registered["options"]} == {"new", "status", "stop"}

    await fake.slash(discord_.bob, fake.general_id, "loop", "status")
    await until(lambda: fake.ephemerals_for(discord_.bob), what="the status answer")
    assert "No loop here" in fake.ephemerals_for(discord_.bob)[-1]

    await fake.slash(discord_.alice, fake.general_id, "loop", "new", title="release planning")
    await until(lambda: fake.ephemerals_for(discord_.alice), what="the new loop")
    [thread] = fake.threads_of(fake.general_id)
    assert thread.name == "release planning"
    loop = await discord_.loop_of(thread.id)
    assert loop is not None and loop.title == "release planning"
    assert f"Started loop `{loop.id}` in <#{thread.id}>" in fake.ephemerals_for(discord_.alice)[-1]
    assert loop.id in fake.bot_messages(thread.id)[0].content  # the thread says what it is

    await fake.say(discord_.alice, "[[slow: 6]]", channel=thread.id)
    await until(
        lambda: any(m.content.startswith("slow") for m in fake.bot_messages(thread.id)),
        what="a turn streaming",
    )
    await fake.slash(discord_.bob, thread.id, "loop", "status")
    await until(lambda: len(fake.ephemerals_for(discord_.bob)) == 2, what="the status")
    assert f"Loop `{loop.id}`" in fake.ephemerals_for(discord_.bob)[-1]
    assert "busy · 0 queued · 1 turns" in fake.ephemerals_for(discord_.bob)[-1]

    await fake.slash(discord_.bob, thread.id, "loop", "stop")  # not Bob's loop
    await until(lambda: len(fake.ephemerals_for(discord_.bob)) == 3, what="a refusal")
    assert "Only the person" in fake.ephemerals_for(discord_.bob)[-1]
    await fake.slash(discord_.alice, thread.id, "loop", "stop")
    await discord_.turns(1, within=20)
    history = await discord_.client.history(loop.id)
    assert history.data[0].ended == "interrupted"
    await fake.slash(discord_.alice, thread.id, "loop", "status")
    await until(lambda: "idle" in fake.ephemerals_for(discord_.alice)[-1], what="idle status")
    assert all(i.answered_at is not None for i in fake.interactions.values())


# ---- the command line ----------------------------------------------------------------------


async def run_cli(*args: str, **env: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge.cli",
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, out.decode(), err.decode()


async def test_invite_url_from_the_command_line() -> None:
    # A bot token's first part is its application's id, base64-encoded.
    token = "MTEwMDAwMDAwMDAwMDAwMDAwMQ.GfAKEx.fake-signature"
    code, out, err = await run_cli("discord", "--invite-url", LOOPBRIDGE_DISCORD_TOKEN=token)
    assert code == 0, err
    url = urllib.parse.urlsplit(out.strip())
    query = urllib.parse.parse_qs(url.query)
    assert url.netloc == "discord.com" and query["client_id"] == ["1100000000000000001"]
    assert query["scope"] == ["bot applications.commands"]
    assert discord.Permissions(int(query["permissions"][0])) == PERMISSIONS

    code, out, err = await run_cli("discord", LOOPBRIDGE_DISCORD_TOKEN="")
    assert code == 2 and err.startswith("loopbridge: ") and "LOOPBRIDGE_DISCORD_TOKEN" in err


async def test_loopbridge_discord_runs_the_adapter(discord_: Harness) -> None:
    fake = discord_.fake
    env = {
        "LOOPBRIDGE_DISCORD_TOKEN": fake.token,
        "LOOPBRIDGE_DISCORD_API_URL": fake.api_url,
        "LOOPBRIDGE_DISCORD_GATEWAY_URL": fake.gateway_url,
        "LOOPBRIDGE_DISCORD_COMMAND_GUILDS": fake.guild_id,
        "LOOPBRIDGE_DISCORD_GUILD_READY_TIMEOUT": "0.1",
        "LOOPBRIDGE_API_URL": discord_.server.url,
        "LOOPBRIDGE_API_TOKEN": discord_.token,
    }
    code, _, err = await run_cli("discord", **(env | {"LOOPBRIDGE_DISCORD_TOKEN": "wrong"}))
    assert code == 2 and err.startswith("loopbridge: Discord refused LOOPBRIDGE_DISCORD_TOKEN")
    assert len(err.strip().splitlines()) == 1, err

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge.cli",
        "discord",
        env={**os.environ, **env},
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await fake.wait_ready()
        asked = await fake.say(discord_.alice, "from the command line", mention=True)
        await until(
            lambda: discord_.answers(asked.id) == ["Echo #1: from the command line"],
            what="the answer of `loopbridge discord`",
        )
    finally:
        process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), 30)
    assert "Traceback" not in err.decode(), err.decode()


async def test_the_bot_comes_back_after_the_gateway_drops(discord_: Harness) -> None:
    fake = discord_.fake
    await discord_.start()
    asked = await fake.say(discord_.alice, "before the drop", mention=True)
    await discord_.turns(1)
    await fake.drop_gateway()
    await fake.wait_ready()  # discord.py reconnects (and identifies: the fake keeps no sessions)
    assert fake.identified == 2
    await fake.say(discord_.alice, "after the drop", channel=asked.id)
    await discord_.turns(2)
    assert discord_.answers(asked.id) == ["Echo #1: before the drop", "Echo #2: after the drop"]


async def test_a_message_sent_while_busy_waits_its_turn_in_order(discord_: Harness) -> None:
    fake = discord_.fake
    await discord_.start()
    asked = await fake.say(discord_.alice, "[[slow: 2]]", mention=True)
    await until(lambda: discord_.answer(asked.id), what="the first answer streaming")
    await fake.say(discord_.alice, "next", channel=asked.id)
    await until(
        lambda: any("queued behind 1 message" in m.embed_text for m in fake.bot_messages(asked.id)),
        what="a queued note",
    )
    await discord_.turns(2)
    first, second = discord_.answers(asked.id)
    assert first.startswith("slow 1/10.") and first.rstrip().endswith("slow 10/10.")
    assert second == "Echo #2: next"


async def test_the_adapter_inside_the_server_uses_an_in_process_client(discord_: Harness) -> None:
    from adapters.discord.runner import start_embedded
    from bridge.server.app import create_app

    fake = discord_.fake
    app = create_app(discord_.server.engine, manage_engine=False)
    env = {
        "LOOPBRIDGE_DISCORD_TOKEN": fake.token,
        "LOOPBRIDGE_DISCORD_API_URL": fake.api_url,
        "LOOPBRIDGE_DISCORD_GATEWAY_URL": fake.gateway_url,
        "LOOPBRIDGE_DISCORD_GUILD_READY_TIMEOUT": "0.1",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        adapter = await start_embedded(app, discord_.token)
    assert adapter is not None
    try:
        asked = await fake.say(discord_.alice, "in process", mention=True)
        await until(lambda: any(r.handled == "turn" for r in adapter.results), what="a turn")
        assert discord_.answers(asked.id) == ["Echo #1: in process"]
        assert fake.commands[None], "without command guilds the commands are global"
    finally:
        await adapter.stop()
        await adapter.client.aclose()


# ---- first words -----------------------------------------------------------------------

# From the model's first delta to the first words in the thread. The aim is 100 ms (see
# bench/bench_firstwords.py); this bound holds on a loaded machine, and the renderer that
# held the first text for the edit interval took ~1 s on a warm turn.
FIRST_WORDS_WITHIN = 0.5


def first_shown(fake: FakeDiscord, channel: str, since: float, words: str) -> float | None:
    """When a message of the channel first showed `words` (since `since`)."""
    times = [
        at
        for message in fake.bot_messages(channel)
        for at, content in message.shown
        if at >= since and words in content
    ]
    return min(times, default=None)


async def test_first_words_show_at_once_even_right_after_a_long_answer(
    discord_: Harness,
) -> None:
    fake = discord_.fake
    standin = discord_.server.standin
    await discord_.start()
    lags: list[float] = []
    thread = None
    # Cold (a new loop's agent starts), then warm twice: each follow-up is sent as soon
    # as the previous answer ended, when its edits have used the channel's budget.
    for turn, scenario in enumerate(("[[slow: 4]]", "[[slow: 4]]", "[[slow: 1]]"), 1):
        sent = len(standin.first_deltas)
        since = time.monotonic()
        if thread is None:
            thread = (await fake.say(discord_.alice, scenario, mention=True)).id
        else:
            await fake.say(discord_.alice, scenario, channel=thread)
        await until(lambda n=sent: len(standin.first_deltas) > n, 30, "the model's first delta")
        shown = await until(
            lambda t=thread, s=since: first_shown(fake, t, s, "slow 1/10."), 10, "first words"
        )
        lags.append(shown - standin.first_deltas[sent])
        await discord_.turns(turn)
    assert all(lag < FIRST_WORDS_WITHIN for lag in lags), lags
    assert fake.rate_limited() == [] and fake.refused() == []
    assert discord_.answers(thread)[-1].strip().endswith("slow 10/10.")
