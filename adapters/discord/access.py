"""What the bot asks of Discord: gateway intents, channel permissions, and its invite URL."""

from __future__ import annotations

import base64
import binascii

import discord

from adapters.discord.settings import DiscordSettings

# Guilds (channels and threads), messages in guilds and in DMs, and their text.
# Message content is a privileged intent: switch it on in the Developer Portal (Bot page).
INTENTS = discord.Intents(guilds=True, guild_messages=True, dm_messages=True, message_content=True)
PERMISSIONS = discord.Permissions(
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    create_public_threads=True,
    read_message_history=True,  # a thread's earlier messages, when the bot is mentioned in it
    embed_links=True,  # tool activity and status are a small embed under the answer
    attach_files=True,  # files the agent shares; the rest of a very long answer, as answer.md
    add_reactions=True,  # 🚫 on a message from someone not allowed to talk to the agent
)
SCOPES = ("bot", "applications.commands")


def application_id(settings: DiscordSettings) -> str:
    """The application's id: set, or read from the bot token (its first part is the bot's
    user id, which is its application's id)."""
    if settings.application_id:
        return settings.application_id
    if settings.token is None:
        raise ValueError("set LOOPBRIDGE_DISCORD_APPLICATION_ID (or LOOPBRIDGE_DISCORD_TOKEN)")
    first = settings.token.get_secret_value().split(".", 1)[0]
    try:
        decoded = base64.urlsafe_b64decode(first + "=" * (-len(first) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        decoded = ""
    if not decoded.isdigit():
        raise ValueError(
            "the token does not name its application: set LOOPBRIDGE_DISCORD_APPLICATION_ID"
        )
    return decoded


def invite_url(settings: DiscordSettings) -> str:
    return discord.utils.oauth_url(application_id(settings), permissions=PERMISSIONS, scopes=SCOPES)
