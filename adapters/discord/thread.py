"""A Discord conversation (a thread, a DM, a bound channel) as the `Surface` of a turn.

A mention in a text channel starts a thread on that message; the thread is made
just before the turn's first message is posted, so a message that never becomes
a turn (refused, a duplicate, empty) leaves no thread behind. Discord gives a
thread started from a message the message's id, so the conversation's key is
known before the thread exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import discord

from adapters.discord.components import answer_view, choice_view
from adapters.discord.content import answer_content, choice_content, measure, status_embed
from adapters.discord.pacing import ChannelBudget
from adapters.discord.settings import DiscordSettings
from adapters.views import ChoiceView, MessageView, TurnState

# Discord's error code for "a thread has already been created for this message".
THREAD_EXISTS = 160004
NO_MENTIONS = discord.AllowedMentions.none()


@dataclass(frozen=True)
class ThreadStart:
    """A thread still to be started on a person's message (its id becomes the thread's)."""

    guild_id: int
    parent_id: int
    message_id: int
    name: str


class DiscordThread:
    """One turn's messages in one Discord channel."""

    append_only = False

    def __init__(
        self,
        bot: discord.Client,
        budget: ChannelBudget,
        settings: DiscordSettings,
        *,
        channel_id: int,
        start: ThreadStart | None = None,
    ) -> None:
        self.bot = bot
        self.budget = budget
        self.part_limit = settings.part_limit
        self.edit_interval = settings.edit_interval
        self.archive_minutes = settings.thread_archive_minutes
        self.option_buttons = settings.option_buttons
        self.channel = bot.get_partial_messageable(channel_id)
        self._start = start

    def measure(self, markdown: str) -> int:
        return measure(markdown)

    async def post(self, view: MessageView) -> str:
        await self._start_thread()
        async with self.budget.slot(self.channel.id, live=view.live):
            message = await self.channel.send(
                content=answer_content(view) or None, embed=status_embed(view),
                view=answer_view(view), allowed_mentions=NO_MENTIONS,
            )
        return str(message.id)

    async def edit(self, message_id: str, view: MessageView) -> None:
        async with self.budget.slot(self.channel.id, live=view.live):
            await self.channel.get_partial_message(int(message_id)).edit(
                content=answer_content(view) or None, embed=status_embed(view),
                view=answer_view(view), allowed_mentions=NO_MENTIONS,
            )

    async def post_choice(self, view: ChoiceView) -> str:
        await self._start_thread()
        async with self.budget.slot(self.channel.id, live=False):
            message = await self.channel.send(
                content=choice_content(view), view=choice_view(view, self.option_buttons),
                allowed_mentions=NO_MENTIONS,
            )
        return str(message.id)

    async def edit_choice(self, message_id: str, view: ChoiceView) -> None:
        async with self.budget.slot(self.channel.id, live=False):
            await self.channel.get_partial_message(int(message_id)).edit(
                content=choice_content(view), view=choice_view(view, self.option_buttons),
                allowed_mentions=NO_MENTIONS,
            )

    async def close(self, state: TurnState) -> None:
        """Nothing to close: every message got its final edit from the renderer."""

    async def _start_thread(self) -> None:
        if self._start is None:
            return
        start = self._start
        parent = self.bot.get_partial_messageable(start.parent_id, guild_id=start.guild_id)
        try:
            await parent.get_partial_message(start.message_id).create_thread(
                name=start.name, auto_archive_duration=self.archive_minutes
            )
        except discord.HTTPException as exc:
            if exc.code != THREAD_EXISTS:
                raise
        self._start = None
