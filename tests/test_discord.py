"""The Discord adapter end to end: real discord.py ↔ a fake Discord, real loop server and CLI.

What a person would see is read back from the fake: the final content of every
message in a thread, its buttons, and the answers only one person saw.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable

import discord
import pytest
import pytest_asyncio
from discord.gateway import DiscordWebSocket

from adapters.actions import Action
from adapters.discord import DiscordAdapter, DiscordSettings
from bridge.client import LoopClient
from tests.fakes.discord import FakeDiscord, Message

pytestmark = pytest.mark.asyncio(loop_scope="session")

ADMIN_ROLE = "1500000000000000001"
FENCE = re.compile(r"^```", re.MULTILINE)
CHOICE_VERBS = ("allow", "deny", "answer", "submit")


async def until(check: Callable[[], object], timeout: float = 30.0, what: str = "") -> object:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.05)


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
            token=FakeDiscord.token, api_url=self.fake.api_url,
            gateway_url=self.fake.gateway_url, admins=[ADMIN_ROLE],
            command_guilds=[FakeDiscord.guild_id], guild_ready_timeout=0.1,
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

    async def turns(self, count: int, timeout: float = 60.0) -> None:
        """Wait until the adapter has finished `count` turns (since it started)."""
        adapter = self.adapter
        assert adapter is not None

        def done() -> bool:
            finished = sum(r.handled == "turn" for r in adapter.results)
            return finished >= count and not adapter._tasks

        await until(done, timeout, f"{count} turns")

    def answers(self, channel: str) -> list[str]:
        """The content of each answer message in a channel (choices left out)."""
        return [m.content for m in self.fake.bot_messages(channel) if not is_choice(m)]

    def answer(self, channel: str) -> str:
        return "".join(self.answers(channel))

    def choices(self, channel: str) -> list[Message]:
        return [m for m in self.fake.bot_messages(channel) if is_choice(m)]

    async def loop_of(self, thread: str, channel: str = FakeDiscord.general_id):
        assert self.client is not None
        key = f"discord:{FakeDiscord.guild_id}:{channel}:{thread}"
        return await self.client.find_loop({"binding": key})


@pytest_asyncio.fixture(loop_scope="session")
async def discord_(server) -> AsyncIterator[Harness]:
    saved = discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    fake = FakeDiscord()
    await fake.start()
    harness = Harness(server, fake, await server.token_for("discordbot"))
    try:
        yield harness
    finally:
        await harness.stop()
        await fake.stop()
        discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = saved


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


async def test_a_bound_channel_is_one_loop_without_mentions(discord_: Harness) -> None:
    fake = discord_.fake
    dev = fake.text_channel("dev")
    await discord_.start(bound_channels=[dev.id])
    await fake.say(discord_.alice, "no mention needed", channel=dev.id)
    await discord_.turns(1)
    await fake.say(discord_.bob, "still the same loop", channel=dev.id)
    await discord_.turns(2)
    assert discord_.answers(dev.id) == ["Echo #1: no mention needed", "Echo #2: still the same loop"]
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
    await discord_.turns(1, timeout=20)
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
    loop = await discord_.loop_of(asked.id)
    assert (discord_.server.engine.sandbox.workdir(loop.id) / "discord-restart.txt").exists()
    # The rest of the turn is shown below the choice, not lost with the old process.
    await until(lambda: "Tool ok" in discord_.answer(asked.id), what="the rest of the turn")
    await discord_.adapter.idle()
    history = await discord_.client.history(loop.id)
    assert history.data[0].ended == "done"
    assert discord_.answers(asked.id)[-1] == history.data[0].assistant_text
