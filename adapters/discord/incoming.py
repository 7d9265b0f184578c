"""What the platform-neutral part sees of Discord: conversation keys, people, messages.

Conversations, as `ConversationKey(platform, workspace, channel, thread)`:

- a thread: (discord, guild, parent channel, thread) — the parent is the channel
  that the "who may start loops" setting names;
- a direct-message channel: (discord, @me, channel, channel) — the whole DM is one loop;
- a channel bound whole by the settings: (discord, guild, channel, channel);
- a mention in any other text channel starts a thread on that message, whose id
  is the message's: (discord, guild, channel, message).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any

import discord

from adapters.binding import ConversationKey, title_from
from adapters.conversations import IncomingMessage
from adapters.discord.thread import ThreadStart
from adapters.policy import Actor

PLATFORM = "discord"
DM_WORKSPACE = "@me"
# Message types a person writes; joins, pins and thread notices are not for the agent.
PERSON_TYPES = frozenset({discord.MessageType.default, discord.MessageType.reply})


@dataclass(frozen=True)
class Incoming:
    message: IncomingMessage
    # Set when the message starts a new thread.
    start: ThreadStart | None = None


def actor_of(user: discord.User | discord.Member) -> Actor:
    """A Discord user with their roles (in a guild), for the who-may-do-what settings."""
    roles = getattr(user, "roles", None) or ()
    return Actor(str(user.id), frozenset(str(role.id) for role in roles), user.display_name)


def conversation_key(channel: object, bound_channels: frozenset[str]) -> ConversationKey | None:
    """The conversation a channel is by itself, or None (a text channel not bound)."""
    if isinstance(channel, discord.Thread) and channel.parent_id is not None:
        guild, parent = str(channel.guild.id), str(channel.parent_id)
        return ConversationKey(PLATFORM, guild, parent, str(channel.id))
    if isinstance(channel, discord.DMChannel):
        return ConversationKey(PLATFORM, DM_WORKSPACE, str(channel.id), str(channel.id))
    in_guild = getattr(channel, "guild", None)
    channel_id = getattr(channel, "id", None)
    if in_guild is not None and channel_id is not None and str(channel_id) in bound_channels:
        return ConversationKey(PLATFORM, str(in_guild.id), str(channel_id), str(channel_id))
    return None


async def resolved(bot: discord.Client, channel: Any) -> Any:
    """A channel discord.py did not have in its cache (a thread it was not told of), fetched;
    as it was when Discord will not show it (then it is no conversation of the bot's)."""
    if isinstance(channel, discord.PartialMessageable):
        with contextlib.suppress(discord.HTTPException):
            fetched = await bot.fetch_channel(channel.id)
            if isinstance(fetched, discord.abc.Messageable):
                return fetched
    return channel


async def incoming(
    bot: discord.Client, message: discord.Message, bound_channels: frozenset[str]
) -> Incoming | None:
    """A person's Discord message as the neutral part sees it, or None to ignore it."""
    me = bot.user
    if (
        me is None
        or message.author.bot
        or message.webhook_id is not None
        or message.type not in PERSON_TYPES
    ):
        return None
    mentioned = any(user.id == me.id for user in message.mentions)
    text = re.sub(rf"<@!?{me.id}>", " ", message.content).strip()
    channel = await resolved(bot, message.channel)
    key = conversation_key(channel, bound_channels)
    start = None
    if key is None:
        if not mentioned or message.guild is None:
            return None
        key = ConversationKey(PLATFORM, str(message.guild.id), str(channel.id), str(message.id))
        start = ThreadStart(message.guild.id, channel.id, message.id, title_from(text))
    # A DM or a bound channel: every message there is for the bot.
    direct = key.channel == key.thread
    person = IncomingMessage(
        key, str(message.id), actor_of(message.author), text, mentioned=mentioned, direct=direct
    )
    return Incoming(person, start)
