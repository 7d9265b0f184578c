"""A Discord conversation's extras for the shared part (`ChatThread`): the thread's
earlier messages (one channel-history read per mention), the files on a message
(attachment URLs), notes, and files the agent shares (a message with an attachment,
within the server's upload limit, which its boost level sets)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import AsyncIterator
from dataclasses import replace
from urllib.parse import urlsplit

import discord
import httpx

from adapters.attachments import fetch
from adapters.chat_thread import IncomingFile
from adapters.context import ThreadMessage
from adapters.discord.incoming import Incoming
from adapters.discord.pacing import ChannelBudget
from adapters.discord.thread import ThreadStart, open_thread

# Where Discord serves attachments.
FILE_HOSTS = frozenset({"discordapp.com", "discordapp.net", "discord.com"})
# One history call (Discord gives at most 100 messages a call).
HISTORY_LIMIT = 100
# A server without boosts takes 10 MiB a message.
DEFAULT_FILE_LIMIT = 10 * 1024 * 1024
NO_MENTIONS = discord.AllowedMentions.none()


class DiscordChat:
    """One process's Discord extras; `enrich` gives a message its files and thread."""

    def __init__(
        self,
        bot: discord.Client,
        budget: ChannelBudget,
        archive_minutes: int,
        api_url: str | None,
    ) -> None:
        self.bot = bot
        self.budget = budget
        self.archive_minutes = archive_minutes
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(30.0), follow_redirects=False)
        # The REST host may serve files too (a proxy, a test's fake Discord).
        api_host = urlsplit(api_url or "").hostname or ""
        self.hosts = FILE_HOSTS | ({api_host} if api_host else set())

    async def aclose(self) -> None:
        await self.http.aclose()

    def enrich(self, found: Incoming, message: discord.Message) -> Incoming:
        files = tuple(
            IncomingFile(a.filename, a.url, a.size, (a.content_type or "").split(";")[0])
            for a in message.attachments
        )
        limit = message.guild.filesize_limit if message.guild else DEFAULT_FILE_LIMIT
        thread = DiscordChatThread(self, int(found.message.key.thread), found.start, limit)
        return replace(found, message=replace(found.message, files=files, thread=thread))


def message_text(message: discord.Message) -> str:
    """A message's text; a bot's that lives only in embeds, from there."""
    parts = [message.content]
    for embed in message.embeds:
        parts += [embed.title or "", embed.description or ""]
        parts += [f"{field.name}: {field.value}" for field in embed.fields]
    parts += [f"(attached: {a.filename})" for a in message.attachments]
    return "\n".join(part for part in parts if part and part.strip())


class DiscordChatThread:
    """The `ChatThread` of one Discord conversation (a thread still to be started on the
    person's message is started by the first note, as by the first answer)."""

    def __init__(
        self, chat: DiscordChat, channel_id: int, start: ThreadStart | None, file_limit: int
    ) -> None:
        self.chat = chat
        self.channel_id = channel_id
        self.start = start
        self.file_limit = file_limit

    async def history(self, before: str) -> list[ThreadMessage]:
        channel = self.chat.bot.get_channel(self.channel_id) or await self.chat.bot.fetch_channel(
            self.channel_id
        )
        if not isinstance(channel, discord.abc.Messageable):
            return []
        found = [
            m
            async for m in channel.history(
                limit=HISTORY_LIMIT, before=discord.Object(int(before)), oldest_first=False
            )
        ]
        found.reverse()
        return [
            ThreadMessage(
                f"discord:{m.author.id}", m.author.display_name, message_text(m), bot=m.author.bot
            )
            for m in found
        ]

    @contextlib.asynccontextmanager
    async def download(self, file: IncomingFile) -> AsyncIterator[AsyncIterator[bytes]]:
        assert file.url is not None
        async with fetch(
            self.chat.http,
            file.url,
            hosts=frozenset(self.chat.hosts),
            expect_html=file.media_type == "text/html",
        ) as chunks:
            yield chunks

    async def _channel(self) -> discord.PartialMessageable:
        if self.start is not None:
            await open_thread(self.chat.bot, self.start, self.chat.archive_minutes)
            self.start = None
        return self.chat.bot.get_partial_messageable(self.channel_id)

    async def say(self, text: str) -> None:
        channel = await self._channel()
        async with self.chat.budget.slot(self.channel_id, "post", live=False):
            await channel.send(text, allowed_mentions=NO_MENTIONS)

    async def post_file(self, name: str, data: bytes, caption: str) -> None:
        channel = await self._channel()
        async with self.chat.budget.slot(self.channel_id, "post", live=False):
            await channel.send(
                caption or None,
                file=discord.File(io.BytesIO(data), filename=name),
                allowed_mentions=NO_MENTIONS,
            )
