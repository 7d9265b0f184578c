"""A Slack thread's extras for the shared part (`ChatThread`): who people are
(`users.info`, cached), the thread's earlier messages (one `conversations.replies` call
per mention), the files on a message (`url_private`, with the bot token), notes, and
files the agent shares (the external upload flow: `files.getUploadURLExternal`, the
upload, `files.completeUploadExternal`, which slack-sdk's `files_upload_v2` makes)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import httpx
from slack_sdk.web.async_client import AsyncWebClient

from adapters.attachments import fetch
from adapters.chat_thread import IncomingFile
from adapters.context import ThreadMessage
from adapters.conversations import IncomingMessage
from adapters.policy import Actor

log = logging.getLogger(__name__)

# Where Slack serves files (`url_private` is on files.slack.com).
FILE_HOSTS = frozenset({"slack.com", "slack-edge.com", "slack-files.com"})
# conversations.replies returns the oldest first, at most 1,000 a call: one call with the
# largest page holds the newest earlier messages of all but the longest threads.
REPLIES_LIMIT = 1000
# Files Slack lists but does not hand out through `url_private`.
NOT_DOWNLOADABLE = frozenset({"external", "tombstone", "hidden_by_limit"})
NAMES_KEPT = 2000
PROFILE_NAMES = ("display_name", "real_name")


class UserNames:
    """Display names by user id, from `users.info`, kept (bounded) for the process; a
    lookup in flight is shared, so a burst of messages asks once per person."""

    def __init__(self, web: AsyncWebClient) -> None:
        self.web = web
        self._names: OrderedDict[str, asyncio.Task[str]] = OrderedDict()

    async def name(self, user_id: str) -> str:
        task = self._names.get(user_id)
        if task is None:
            task = self._names[user_id] = asyncio.create_task(self._look_up(user_id))
            if len(self._names) > NAMES_KEPT:
                self._names.popitem(last=False)
        else:
            self._names.move_to_end(user_id)
        return await asyncio.shield(task)

    async def _look_up(self, user_id: str) -> str:
        try:
            user = (await self.web.users_info(user=user_id)).get("user") or {}
        except Exception as exc:  # a name is nice to have: the id stands in for it
            log.info("users.info %s: %s", user_id, exc)
            user = {}
        profile = user.get("profile") or {}
        found = next((str(profile[k]) for k in PROFILE_NAMES if profile.get(k)), "")
        return found or str(user.get("real_name") or user.get("name") or user_id)


class SlackChat:
    """One process's Slack extras; `thread()` gives a `ChatThread` for one thread."""

    def __init__(self, web: AsyncWebClient, bot_token: str, file_limit: int) -> None:
        self.web = web
        self.bot_token = bot_token
        self.file_limit = file_limit
        self.names = UserNames(web)
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(30.0), follow_redirects=False)
        # The Web API's own host may serve files too (a proxy, a test's fake Slack).
        api_host = urlsplit(str(web.base_url)).hostname or ""
        self.hosts = FILE_HOSTS | ({api_host} if api_host else set())

    async def aclose(self) -> None:
        await self.http.aclose()

    async def enrich(self, message: IncomingMessage, event: dict[str, Any]) -> IncomingMessage:
        """The message with its writer's name, its files and its thread's extras."""
        author = message.author
        if not author.name:
            author = Actor(author.user_id, author.roles, await self.names.name(author.user_id))
        files = tuple(incoming_file(item) for item in event.get("files") or [])
        thread = SlackChatThread(self, message.key.channel, message.key.thread)
        return replace(message, author=author, files=files, thread=thread)


def incoming_file(item: dict[str, Any]) -> IncomingFile:
    url = item.get("url_private_download") or item.get("url_private")
    hidden = item.get("mode") in NOT_DOWNLOADABLE or item.get("file_access") == "check_file_info"
    size = item.get("size")
    return IncomingFile(
        name=str(item.get("name") or item.get("title") or item.get("id") or "file"),
        url=None if hidden or not url else str(url),
        size=int(size) if isinstance(size, int) else None,
        media_type=str(item.get("mimetype") or ""),
    )


def message_text(message: dict[str, Any]) -> str:
    """A message's text; a bot's that lives only in blocks or attachments, from there."""
    text = str(message.get("text") or "").strip()
    if text:
        return text
    parts: list[str] = []
    for block in message.get("blocks") or []:
        parts.extend(_block_text(block))
    for attachment in message.get("attachments") or []:
        parts.extend(
            str(attachment.get(k))
            for k in ("pretext", "title", "text", "fallback")
            if attachment.get(k)
        )
    return "\n".join(part for part in parts if part.strip())


def _block_text(block: dict[str, Any]) -> list[str]:
    kind = block.get("type")
    if kind == "markdown":
        return [str(block.get("text") or "")]
    if kind in ("section", "header"):
        found = [str((block.get("text") or {}).get("text") or "")]
        found += [str(field.get("text") or "") for field in block.get("fields") or []]
        return found
    if kind == "context":
        return [str(e.get("text") or "") for e in block.get("elements") or [] if "text" in e]
    if kind == "rich_text":
        return ["".join(_rich_text(e) for e in block.get("elements") or [])]
    return []


def _rich_text(element: dict[str, Any]) -> str:
    if "elements" in element:
        return "".join(_rich_text(e) for e in element["elements"])
    if element.get("type") == "user":
        return f"<@{element.get('user_id', '')}>"
    return str(element.get("text") or element.get("url") or "")


class SlackChatThread:
    """The `ChatThread` of one Slack thread."""

    def __init__(self, chat: SlackChat, channel: str, thread_ts: str) -> None:
        self.chat = chat
        self.channel = channel
        self.thread_ts = thread_ts
        self.file_limit = chat.file_limit

    async def history(self, before: str) -> list[ThreadMessage]:
        response = await self.chat.web.conversations_replies(
            channel=self.channel,
            ts=self.thread_ts,
            latest=before,
            inclusive=False,
            limit=REPLIES_LIMIT,
        )
        raw = [m for m in response.get("messages") or [] if _ts(m) < _ts({"ts": before})]
        found = []
        for message in raw:
            user = message.get("user")
            bot = bool(message.get("bot_id")) or message.get("subtype") == "bot_message"
            if user and not bot:
                who, name = f"slack:{user}", await self.chat.names.name(str(user))
            else:
                profile = message.get("bot_profile") or {}
                who = f"slack:{message.get('bot_id') or user or 'bot'}"
                name = str(profile.get("name") or message.get("username") or "a bot")
            found.append(ThreadMessage(who, name, message_text(message), bot=bot))
        return found

    @contextlib.asynccontextmanager
    async def download(self, file: IncomingFile) -> AsyncIterator[AsyncIterator[bytes]]:
        assert file.url is not None
        headers = {"Authorization": f"Bearer {self.chat.bot_token}"}
        async with fetch(
            self.chat.http,
            file.url,
            hosts=frozenset(self.chat.hosts),
            headers=headers,
            expect_html=file.media_type == "text/html",
        ) as chunks:
            yield chunks

    async def say(self, text: str) -> None:
        # The fallback text is mrkdwn: escaped, so a name the agent chose cannot @channel.
        await self.chat.web.chat_postMessage(
            channel=self.channel,
            thread_ts=self.thread_ts,
            text=_plain(text),
            blocks=[{"type": "markdown", "text": text}],
        )

    async def post_file(self, name: str, data: bytes, caption: str) -> None:
        await self.chat.web.files_upload_v2(
            channel=self.channel,
            thread_ts=self.thread_ts,
            content=data,
            filename=name,
            title=name,
            initial_comment=_plain(caption) or None,
        )


def _plain(text: str) -> str:
    """Text Slack shows as written: no `<!channel>`, `<@U…>` or links made of it."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _ts(message: dict[str, Any]) -> tuple[int, int]:
    seconds, _, micros = str(message.get("ts") or "0").partition(".")
    return int(seconds or 0), int(micros or 0)
