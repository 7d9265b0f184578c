"""A Discord conversation (a thread, a DM, a bound channel) as the `Surface` of a turn.

A mention in a text channel starts a thread on that message; the thread is made
just before the turn's first message is posted, so a message that never becomes
a turn (refused, a duplicate, empty) leaves no thread behind. Discord gives a
thread started from a message the message's id, so the conversation's key is
known before the thread exists.

Edits of a message that is still live (the answer growing) never hold up the
turn's renderer: when the channel's budget has no slot for one, it waits in the
background, and a newer live view replaces it meanwhile, so only the newest is
sent. A message's first words (the placeholder's first text) may take the slot
the budget keeps in hand, so they show at once even when a previous answer's
edits used the channel's budget. Any other call — a final text, a sealed part, a
choice — first settles the message's live edit (drops it, or lets it finish if
already on its way), so it always lands last.
"""

from __future__ import annotations

import asyncio
import io
import logging
from dataclasses import dataclass
from typing import Any

import discord

from adapters.discord.components import answer_view, choice_view
from adapters.discord.content import answer_content, choice_content, measure, status_embed
from adapters.discord.pacing import ChannelBudget
from adapters.discord.settings import DiscordSettings
from adapters.views import ChoiceView, MessageView, TurnState

log = logging.getLogger(__name__)

# Discord's error code for "a thread has already been created for this message".
THREAD_EXISTS = 160004
NO_MENTIONS = discord.AllowedMentions.none()
ATTACHMENT_NAME = "answer.md"


@dataclass(frozen=True)
class ThreadStart:
    """A thread still to be started on a person's message (its id becomes the thread's)."""

    guild_id: int
    parent_id: int
    message_id: int
    name: str


@dataclass
class _LiveEdit:
    """The newest live view of a message waiting to be sent, and the task sending it."""

    view: MessageView | None
    task: asyncio.Task[None] | None = None
    sending: bool = False
    # The view brings the message's first words.
    first_words: bool = False


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
        self.attach_rest = settings.attach_rest
        self.archive_minutes = settings.archive_duration
        self.option_buttons = settings.option_buttons
        self.channel = bot.get_partial_messageable(channel_id)
        self._start = start
        self._live: dict[str, _LiveEdit] = {}
        # Messages that have shown some text (an edit of any other brings its first words).
        self._worded: set[str] = set()

    def measure(self, markdown: str) -> int:
        return measure(markdown)

    def posts_free(self) -> int | None:
        if not self.attach_rest:
            return None
        return self.budget.free(self.channel.id, "post")

    async def post(self, view: MessageView) -> str:
        await self._start_thread()
        files = [_attached(view.attachment)] if view.attachment else []
        async with self.budget.slot(self.channel.id, "post", live=view.live):
            # discord.py takes None for "no embed, no view"; its stubs do not say so.
            parts: dict[str, Any] = {"embed": status_embed(view), "view": answer_view(view)}
            message = await self.channel.send(
                content=answer_content(view) or None,
                allowed_mentions=NO_MENTIONS,
                files=files,
                **parts,
            )
        if view.text:
            self._worded.add(str(message.id))
        return str(message.id)

    async def edit(self, message_id: str, view: MessageView) -> None:
        first_words = bool(view.text) and message_id not in self._worded
        if view.text:
            self._worded.add(message_id)
        if view.live:
            self._edit_later(message_id, view, first_words)
            return
        await self._settle(message_id)
        async with self.budget.slot(self.channel.id, "edit", live=False):
            await self._edit_now(message_id, view)

    async def _edit_now(self, message_id: str, view: MessageView) -> None:
        await self.channel.get_partial_message(int(message_id)).edit(
            content=answer_content(view) or None,
            embed=status_embed(view),
            view=answer_view(view),
            allowed_mentions=NO_MENTIONS,
        )

    def _edit_later(self, message_id: str, view: MessageView, first_words: bool) -> None:
        pending = self._live.get(message_id)
        if pending is not None and pending.task is not None and not pending.task.done():
            pending.view = view
            return
        pending = _LiveEdit(view, first_words=first_words)
        pending.task = asyncio.create_task(self._send_live(message_id, pending))
        self._live[message_id] = pending

    async def _send_live(self, message_id: str, pending: _LiveEdit) -> None:
        try:
            while pending.view is not None:
                first_words, pending.first_words = pending.first_words, False
                async with self.budget.slot(
                    self.channel.id, "edit", live=True, first_words=first_words
                ):
                    view, pending.view = pending.view, None
                    pending.sending = True
                    try:
                        await self._edit_now(message_id, view)
                    finally:
                        pending.sending = False
        except Exception as exc:
            # Nothing is lost: the message's next edit, and its final one, carry the text.
            log.info("a live edit of %s failed: %s", message_id, exc)

    async def _settle(self, message_id: str) -> None:
        """No live edit of this message is waiting or on its way after this."""
        pending = self._live.pop(message_id, None)
        if pending is None or pending.task is None or pending.task.done():
            return
        pending.view = None
        if not pending.sending:
            pending.task.cancel()
        await asyncio.wait([pending.task])

    async def post_choice(self, view: ChoiceView) -> str:
        await self._start_thread()
        async with self.budget.slot(self.channel.id, "post", live=False):
            controls: dict[str, Any] = {"view": choice_view(view, self.option_buttons)}
            message = await self.channel.send(
                content=choice_content(view), allowed_mentions=NO_MENTIONS, **controls
            )
        return str(message.id)

    async def edit_choice(self, message_id: str, view: ChoiceView) -> None:
        async with self.budget.slot(self.channel.id, "edit", live=False):
            await self.channel.get_partial_message(int(message_id)).edit(
                content=choice_content(view),
                view=choice_view(view, self.option_buttons),
                allowed_mentions=NO_MENTIONS,
            )

    async def close(self, state: TurnState) -> None:
        """Every message has its final edit; a live edit still waiting is not needed."""
        for message_id in list(self._live):
            await self._settle(message_id)

    async def _start_thread(self) -> None:
        if self._start is None:
            return
        await open_thread(self.bot, self._start, self.archive_minutes)
        self._start = None


async def open_thread(bot: discord.Client, start: ThreadStart, archive_minutes: int) -> None:
    """Start the thread on the person's message (already started is fine too)."""
    parent = bot.get_partial_messageable(start.parent_id, guild_id=start.guild_id)
    try:
        await parent.get_partial_message(start.message_id).create_thread(
            name=start.name,
            auto_archive_duration=archive_minutes,  # type: ignore[arg-type]
        )
    except discord.HTTPException as exc:
        if exc.code != THREAD_EXISTS:
            raise


def _attached(text: str) -> discord.File:
    return discord.File(io.BytesIO(text.encode()), filename=ATTACHMENT_NAME)
