"""A fake Discord on 127.0.0.1 that the real discord.py talks to.

REST lives under `/api/v10` (set `discord.http.Route.BASE` to `api_url`) and the
gateway is a websocket at `gateway_url` (set `DiscordWebSocket.DEFAULT_GATEWAY`).
The gateway sends HELLO, answers heartbeats, sends READY and GUILD_CREATE after
IDENTIFY, and then whatever the test makes people do: MESSAGE_CREATE for a
message, INTERACTION_CREATE for a click, a select or a slash command.

It enforces Discord's limits, so that a test fails when the adapter breaks them:
- content over 2,000 characters, an empty message, or components Discord refuses
  (more than 5 rows or 5 buttons in a row, a `custom_id` over 100 characters or
  used twice, a label over 80, a select with no or more than 25 options) are a
  400 with Discord's error JSON (code 50035 / 50006);
- more than `budget` messages created, or edited, in one channel within `window`
  seconds (two buckets, as on Discord) is a 429 with `Retry-After`,
  `X-RateLimit-*` and `Via` headers (the headers discord.py needs to retry it);
  every answer carries its bucket's `X-RateLimit-*` headers, as Discord's do
  (unless `announce` is off);
- an interaction must be answered within 3 s, and once (10062 / 40060);
- without the MESSAGE_CONTENT intent a guild message arrives with empty content
  unless the bot is mentioned, and events need their intents at all.

Files and history, as Discord has them: a person's message may carry attachments,
served (without a token, like Discord's CDN) at their `url`; the bot's attachments
count against `ATTACHMENT_BYTES_LIMIT` (10 MiB, a server without boosts: a 413
above); `GET /channels/{id}/messages` gives a channel's messages newest first, at
most 100 a call (`before`, `limit`).

Every call is recorded (`calls`); `visible()` and `answer()` give what a person
would see in a channel, `ephemerals` what only one person saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
import math
import mimetypes
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, WSMsgType, web

from tests.fakes.serving import serve

CONTENT_LIMIT = 2000
ATTACHMENTS_LIMIT = 10
ATTACHMENT_BYTES_LIMIT = 10 * 1024 * 1024
ROWS_LIMIT = 5
ROW_BUTTONS = 5
CUSTOM_ID_LIMIT = 100
BUTTON_LABEL_LIMIT = 80
SELECT_OPTIONS_LIMIT = 25
SELECT_TEXT_LIMIT = 100
INTERACTION_DEADLINE = 3.0
HISTORY_LIMIT = 100
READY_WAIT = 10.0
EPHEMERAL = 1 << 6
# Gateway intents (the bits Discord defines).
GUILDS = 1 << 0
GUILD_MESSAGES = 1 << 9
DIRECT_MESSAGES = 1 << 12
MESSAGE_CONTENT = 1 << 15
# Channel and component types.
TEXT_CHANNEL, DM_CHANNEL, PUBLIC_THREAD = 0, 1, 11
ACTION_ROW, BUTTON, STRING_SELECT = 1, 2, 3
# Interaction types and callback types.
APPLICATION_COMMAND, MESSAGE_COMPONENT = 2, 3
MESSAGE_WITH_SOURCE, DEFERRED_MESSAGE, DEFERRED_UPDATE, UPDATE_MESSAGE = 4, 5, 6, 7

Json = dict[str, Any]
# Shared by every fake of a test run, so loops bound in one test never match the next's.
_IDS = itertools.count(1_400_000_000_000_000_000)


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


@dataclass
class Call:
    at: float
    method: str
    path: str
    body: Any
    status: int = 200
    code: int | None = None
    # Files uploaded with it: (filename, content).
    files: list[tuple[str, bytes]] = field(default_factory=list)
    query: dict[str, str] = field(default_factory=dict)


@dataclass
class Person:
    id: str
    name: str
    roles: tuple[str, ...] = ()
    bot: bool = False

    def user(self) -> Json:
        return {
            "id": self.id,
            "username": self.name,
            "discriminator": "0",
            "global_name": self.name,
            "avatar": None,
            "bot": self.bot,
        }

    def member(self) -> Json:
        return {
            "roles": list(self.roles),
            "joined_at": _now_iso(),
            "deaf": False,
            "mute": False,
            "flags": 0,
            "nick": None,
            "permissions": "0",
        }


@dataclass
class Channel:
    id: str
    type: int
    name: str
    guild_id: str | None
    parent_id: str | None = None
    owner_id: str | None = None
    recipient: Person | None = None

    def payload(self) -> Json:
        body: Json = {
            "id": self.id,
            "type": self.type,
            "name": self.name,
            "flags": 0,
            "last_message_id": None,
            "rate_limit_per_user": 0,
        }
        if self.guild_id is not None:
            body |= {
                "guild_id": self.guild_id,
                "position": 0,
                "permission_overwrites": [],
                "nsfw": False,
                "parent_id": self.parent_id,
            }
        if self.type == PUBLIC_THREAD:
            body |= {
                "owner_id": self.owner_id,
                "message_count": 0,
                "member_count": 1,
                "total_message_sent": 0,
                "thread_metadata": {
                    "archived": False,
                    "auto_archive_duration": 1440,
                    "archive_timestamp": _now_iso(),
                    "locked": False,
                },
            }
        if self.recipient is not None:
            body["recipients"] = [self.recipient.user()]
        return body


@dataclass
class Message:
    id: str
    channel_id: str
    author: Person
    content: str = ""
    components: list[Json] = field(default_factory=list)
    embeds: list[Json] = field(default_factory=list)
    mentions: list[Person] = field(default_factory=list)
    # Shown to this person only (an ephemeral interaction answer).
    only_for: str | None = None
    # An interaction's answer that is still "thinking" (deferred).
    loading: bool = False
    # Every content this message has shown, oldest first, with when it was shown.
    shown: list[tuple[float, str]] = field(default_factory=list)
    edits: list[float] = field(default_factory=list)
    created: float = field(default_factory=time.monotonic)
    # Every custom_id this message has ever carried (a choice keeps its kind after the edit).
    ever: set[str] = field(default_factory=set)
    # Uploaded files: (id, filename, content).
    attachments: list[tuple[str, str, bytes]] = field(default_factory=list)

    # Where its attachments are served (the fake's own CDN).
    cdn: str = ""

    @property
    def text(self) -> str:
        """What a person reads of it: its content, then the text of its attached files."""
        return self.content + "".join(
            data.decode(errors="replace") for _, _, data in self.attachments
        )

    def payload(self, guild_id: str | None) -> Json:
        body: Json = {
            "id": self.id,
            "channel_id": self.channel_id,
            "author": self.author.user(),
            "content": self.content,
            "timestamp": _now_iso(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [person.user() for person in self.mentions],
            "mention_roles": [],
            "attachments": [
                {
                    "id": id_,
                    "filename": name,
                    "size": len(data),
                    "content_type": mimetypes.guess_type(name)[0] or "application/octet-stream",
                    "url": f"{self.cdn}/attachments/{self.channel_id}/{id_}/{name}",
                    "proxy_url": f"{self.cdn}/attachments/{self.channel_id}/{id_}/{name}",
                }
                for id_, name, data in self.attachments
            ],
            "embeds": self.embeds,
            "pinned": False,
            "type": 0,
            "components": self.components,
            "flags": EPHEMERAL if self.only_for else 0,
        }
        if guild_id is not None:
            body["guild_id"] = guild_id
        return body

    @property
    def bot(self) -> bool:
        return self.author.bot

    def custom_ids(self) -> list[str]:
        return [
            item["custom_id"]
            for row in self.components
            for item in row["components"]
            if "custom_id" in item
        ]

    def component(self, custom_id: str) -> Json:
        for row in self.components:
            for item in row["components"]:
                if item.get("custom_id") == custom_id:
                    return item
        raise KeyError(f"no component {custom_id!r} in {self.components}")

    def find(self, label: str) -> Json:
        """The button with this label (what a person looks for)."""
        for row in self.components:
            for item in row["components"]:
                if item.get("type") == BUTTON and item.get("label") == label:
                    return item
        raise KeyError(f"no button {label!r} in {self.components}")

    def selects(self) -> list[Json]:
        return [
            item
            for row in self.components
            for item in row["components"]
            if item.get("type") == STRING_SELECT
        ]

    @property
    def last_change(self) -> float:
        """When this message last changed in any way (text, controls, embeds)."""
        return self.edits[-1] if self.edits else self.created

    @property
    def has_components(self) -> bool:
        return bool(self.components)

    @property
    def embed_text(self) -> str:
        return "\n".join(str(embed.get("description") or "") for embed in self.embeds)


@dataclass
class Interaction:
    id: str
    token: str
    user: Person
    created: float
    type: int
    message: Message | None = None
    channel_id: str = ""
    response_type: int | None = None
    # The message that answers it (a reply, or the clicked message for an update).
    original: Message | None = None
    answered_at: float | None = None


class _Refused(Exception):
    def __init__(self, status: int, body: Json, headers: dict[str, str] | None = None) -> None:
        super().__init__(body.get("message"))
        self.status = status
        self.body = body
        self.headers = headers or {}


def _form_error(path: str, code: str, message: str) -> _Refused:
    errors: Json = {"_errors": [{"code": code, "message": message}]}
    for part in reversed(path.split(".")):
        errors = {part: errors}
    return _Refused(400, {"code": 50035, "errors": errors, "message": "Invalid Form Body"})


class FakeDiscord:
    token = "fake-discord-bot-token"
    application_id = "1100000000000000001"
    guild_id = "1200000000000000001"
    general_id = "1300000000000000001"

    def __init__(self, *, budget: int = 5, window: float = 5.0, announce: bool = True) -> None:
        self.budget = budget
        self.window = window
        # Whether answers tell the budget (X-RateLimit-*); without it only a 429 does, as
        # with Discord's limits that no header announces.
        self.announce = announce
        self.bot = Person(self.application_id, "loopbridge", bot=True)
        self.people: dict[str, Person] = {}
        self.roles: dict[str, str] = {}
        self.channels: dict[str, Channel] = {
            self.general_id: Channel(self.general_id, TEXT_CHANNEL, "general", self.guild_id),
        }
        self.messages: dict[str, Message] = {}
        self.interactions: dict[str, Interaction] = {}
        self.commands: dict[str | None, list[Json]] = {}
        self.calls: list[Call] = []
        self.ephemerals: list[Message] = []
        self.reactions: list[tuple[str, str]] = []
        self.intents = 0
        self.identified = 0
        self.url = ""
        self._ids = _IDS
        self._writes: dict[tuple[str, str], deque[float]] = {}
        self._sockets: list[web.WebSocketResponse] = []
        self._ready = asyncio.Event()
        self._sequence = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.on_call: Callable[[Call], None] | None = None

    # ---- running -------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/api/v10/{path:.*}", self._rest)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/attachments/{channel}/{id}/{name}", self._attachment)
        self._runner, self.url = await serve(app)
        return self.url

    @property
    def api_url(self) -> str:
        return f"{self.url}/api/v10"

    @property
    def gateway_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/gateway"

    async def stop(self) -> None:
        for socket in list(self._sockets):
            with contextlib.suppress(Exception):
                await socket.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_ready(self) -> None:
        async with asyncio.timeout(READY_WAIT):
            await self._ready.wait()

    def new_id(self) -> str:
        return str(next(self._ids))

    # ---- people and places -----------------------------------------------------------------

    def person(self, user_id: str, name: str, roles: tuple[str, ...] = ()) -> Person:
        for role in roles:
            self.roles.setdefault(role, f"role-{role[-4:]}")
        self.people[user_id] = Person(user_id, name, roles)
        return self.people[user_id]

    def dm_with(self, person: Person) -> Channel:
        for channel in self.channels.values():
            if channel.type == DM_CHANNEL and channel.recipient == person:
                return channel
        channel = Channel(self.new_id(), DM_CHANNEL, "", None, recipient=person)
        self.channels[channel.id] = channel
        return channel

    def thread_by(self, person: Person, parent: str, name: str) -> Channel:
        """A thread a person opened while the bot was not told (no THREAD_CREATE)."""
        thread = Channel(self.new_id(), PUBLIC_THREAD, name, self.guild_id, parent, person.id)
        self.channels[thread.id] = thread
        return thread

    def text_channel(self, name: str) -> Channel:
        channel = Channel(self.new_id(), TEXT_CHANNEL, name, self.guild_id)
        self.channels[channel.id] = channel
        return channel

    # ---- what people do --------------------------------------------------------------

    async def say(
        self,
        person: Person,
        content: str,
        *,
        channel: str | None = None,
        mention: bool = False,
        deliveries: int = 1,
        files: Sequence[tuple[str, bytes]] = (),
    ) -> Message:
        """A person writes; `mention` puts the bot's mention first, as Discord's client does;
        `files` (name, content) are attached."""
        where = self.channels[channel or self.general_id]
        text = f"<@{self.bot.id}> {content}" if mention else content
        message = Message(
            self.new_id(),
            where.id,
            person,
            text,
            mentions=[self.bot] if mention else [],
            cdn=self.url,
        )
        message.attachments = [(self.new_id(), name, data) for name, data in files]
        self._show(message)
        self.messages[message.id] = message
        for _ in range(deliveries):
            await self._dispatch_message(message, where)
        return message

    def other_bot_says(self, channel: str, embeds: list[Json], name: str) -> Message:
        """Another bot posts, its text only in embeds (no event is sent)."""
        other = Person(self.new_id(), name, bot=True)
        message = Message(self.new_id(), channel, other, "", embeds=embeds, cdn=self.url)
        self.messages[message.id] = message
        return message

    async def _attachment(self, request: web.Request) -> web.StreamResponse:
        for message in self.messages.values():
            for id_, name, data in message.attachments:
                if id_ == request.match_info["id"] and name == request.match_info["name"]:
                    kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
                    return web.Response(body=data, content_type=kind)
        return web.Response(status=404, text="not found")

    def shared_files(self, channel: str) -> list[tuple[str, bytes, str]]:
        """Files the bot posted in a channel: (name, content, the message's text)."""
        return [
            (name, data, m.content)
            for m in self.bot_messages(channel)
            for _, name, data in m.attachments
            if name != "answer.md"
        ]

    async def click(self, person: Person, message: Message, custom_id: str) -> Interaction:
        """A person clicks a button of a message."""
        message.component(custom_id)
        data = {"custom_id": custom_id, "component_type": BUTTON}
        return await self._interact(person, MESSAGE_COMPONENT, data, message.channel_id, message)

    async def pick(
        self, person: Person, message: Message, custom_id: str, values: list[str]
    ) -> Interaction:
        """A person chooses options of a select menu (as values)."""
        select = message.component(custom_id)
        known = {option["value"] for option in select["options"]}
        assert set(values) <= known, f"{values} not in {known}"
        data = {"custom_id": custom_id, "component_type": STRING_SELECT, "values": values}
        return await self._interact(person, MESSAGE_COMPONENT, data, message.channel_id, message)

    async def slash(
        self, person: Person, channel: str, command: str, sub: str, **options: str
    ) -> Interaction:
        """A person runs `/command sub option:value…` (the command must be registered)."""
        registered = self.commands.get(self.guild_id, []) + self.commands.get(None, [])
        found = next((c for c in registered if c["name"] == command), None)
        assert found is not None, f"/{command} is not registered: {self.commands}"
        scope = self.guild_id if found in self.commands.get(self.guild_id, []) else None
        data: Json = {
            "id": found["id"],
            "name": command,
            "type": 1,
            "options": [
                {
                    "name": sub,
                    "type": 1,
                    "options": [
                        {"name": name, "type": 3, "value": value} for name, value in options.items()
                    ],
                }
            ],
        }
        if scope is not None:
            data["guild_id"] = scope
        return await self._interact(person, APPLICATION_COMMAND, data, channel, None)

    async def _interact(
        self, person: Person, kind: int, data: Json, channel_id: str, message: Message | None
    ) -> Interaction:
        interaction = Interaction(
            self.new_id(),
            f"itoken{self.new_id()}",
            person,
            time.monotonic(),
            kind,
            message,
            channel_id,
        )
        self.interactions[interaction.id] = interaction
        channel = self.channels[channel_id]
        body: Json = {
            "id": interaction.id,
            "application_id": self.application_id,
            "type": kind,
            "data": data,
            "channel_id": channel_id,
            "channel": channel.payload(),
            "token": interaction.token,
            "version": 1,
            "locale": "en-US",
            "app_permissions": "0",
            "entitlements": [],
            "authorizing_integration_owners": {},
            "attachment_size_limit": 8 << 20,
            "context": 0 if channel.guild_id else 1,
        }
        if channel.guild_id is not None:
            body |= {
                "guild_id": channel.guild_id,
                "guild_locale": "en-US",
                "member": {**person.member(), "user": person.user()},
            }
        else:
            body["user"] = person.user()
        if message is not None:
            body["message"] = message.payload(channel.guild_id)
        await self.dispatch("INTERACTION_CREATE", body)
        return interaction

    # ---- what people see -----------------------------------------------------------------

    def visible(self, channel: str) -> list[Message]:
        """What everyone sees in a channel, oldest first (no ephemerals, no loading)."""
        return [
            m
            for m in self.messages.values()
            if m.channel_id == channel and m.only_for is None and not m.loading
        ]

    def bot_messages(self, channel: str) -> list[Message]:
        """What the adapter's bot shows in a channel."""
        return [m for m in self.visible(channel) if m.author == self.bot]

    def threads_of(self, channel: str) -> list[Channel]:
        return [c for c in self.channels.values() if c.parent_id == channel]

    def ephemerals_for(self, person: Person) -> list[str]:
        """What only this person saw (answers still "thinking" left out)."""
        return [m.content for m in self.ephemerals if m.only_for == person.id and not m.loading]

    def rate_limited(self) -> list[Call]:
        return [call for call in self.calls if call.status == 429]

    def refused(self) -> list[Call]:
        """Calls Discord refused for a reason other than a rate limit."""
        return [call for call in self.calls if call.status >= 400 and call.status != 429]

    def message_writes(self) -> list[Call]:
        return [call for call in self.calls if call.status < 300 and _is_message_write(call)]

    # ---- the gateway -------------------------------------------------------------------

    async def dispatch(self, event: str, data: Json, *, wait: bool = True) -> None:
        """Sends an event to the connected bot; `wait=False` drops it when none is."""
        if wait:
            await self.wait_ready()
        frame = json.dumps({"op": 0, "t": event, "s": next(self._sequence), "d": data})
        for socket in list(self._sockets):
            with contextlib.suppress(ConnectionError):
                await socket.send_str(frame)

    async def drop_gateway(self) -> None:
        self._ready.clear()
        for socket in list(self._sockets):
            await socket.close()

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        await socket.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}))
        try:
            async for frame in socket:
                if frame.type != WSMsgType.TEXT:
                    continue
                payload = json.loads(frame.data)
                if payload["op"] == 1:
                    await socket.send_str(json.dumps({"op": 11}))
                elif payload["op"] == 2:
                    await self._identify(socket, payload["d"])
                elif payload["op"] == 6:
                    # Sessions are not kept: the client identifies again.
                    await socket.send_str(json.dumps({"op": 9, "d": False}))
        finally:
            if socket in self._sockets:
                self._sockets.remove(socket)
                if not self._sockets:
                    self._ready.clear()
        return socket

    async def _identify(self, socket: web.WebSocketResponse, data: Json) -> None:
        if data.get("token") != self.token:
            await socket.close(code=4004, message=b"Authentication failed.")
            return
        self.intents = int(data.get("intents", 0))
        self.identified += 1
        ready = {
            "v": 10,
            "user": self.bot.user(),
            "session_id": f"session{self.identified}",
            "resume_gateway_url": self.gateway_url,
            "guilds": [{"id": self.guild_id, "unavailable": True}],
            "application": {"id": self.application_id, "flags": 0},
            "private_channels": [],
            "relationships": [],
            "shard": [0, 1],
        }
        await socket.send_str(
            json.dumps({"op": 0, "t": "READY", "s": next(self._sequence), "d": ready})
        )
        guild = self._guild()
        await socket.send_str(
            json.dumps({"op": 0, "t": "GUILD_CREATE", "s": next(self._sequence), "d": guild})
        )
        self._sockets.append(socket)
        self._ready.set()

    def _guild(self) -> Json:
        roles = [
            {
                "id": self.guild_id,
                "name": "@everyone",
                "permissions": "0",
                "position": 0,
                "color": 0,
                "hoist": False,
                "managed": False,
                "mentionable": False,
                "flags": 0,
            }
        ]
        roles += [
            {
                "id": role,
                "name": name,
                "permissions": "0",
                "position": 1,
                "color": 0,
                "hoist": False,
                "managed": False,
                "mentionable": False,
                "flags": 0,
            }
            for role, name in self.roles.items()
        ]
        in_guild = [c for c in self.channels.values() if c.guild_id == self.guild_id]
        return {
            "id": self.guild_id,
            "name": "Fake Guild",
            "icon": None,
            "owner_id": "1",
            "unavailable": False,
            "large": False,
            "member_count": len(self.people) + 1,
            "roles": roles,
            "emojis": [],
            "stickers": [],
            "features": [],
            "channels": [c.payload() for c in in_guild if c.type == TEXT_CHANNEL],
            "threads": [c.payload() for c in in_guild if c.type == PUBLIC_THREAD],
            "members": [{**self.bot.member(), "user": self.bot.user()}],
            "voice_states": [],
            "presences": [],
            "joined_at": _now_iso(),
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "premium_tier": 0,
            "preferred_locale": "en-US",
            "nsfw_level": 0,
            "system_channel_flags": 0,
        }

    async def _dispatch_message(
        self, message: Message, channel: Channel, *, wait: bool = True
    ) -> None:
        if channel.guild_id is None:
            if not self.intents & DIRECT_MESSAGES:
                return
        elif not self.intents & GUILD_MESSAGES:
            return
        body = message.payload(channel.guild_id)
        content_allowed = (
            self.intents & MESSAGE_CONTENT
            or channel.guild_id is None
            or self.bot in message.mentions
            or message.author == self.bot
        )
        if not content_allowed:
            body |= {"content": "", "components": [], "embeds": []}
        if channel.guild_id is not None:
            body["member"] = message.author.member()
        await self.dispatch("MESSAGE_CREATE", body, wait=wait)

    # ---- REST ----------------------------------------------------------------------------

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["path"]
        call = Call(time.monotonic(), request.method, path, None, query=dict(request.query))
        self.calls.append(call)
        parts = path.strip("/").split("/")
        try:
            if request.content_type == "multipart/form-data":
                call.body, call.files = await _multipart(request)
            elif request.can_read_body:
                call.body = await request.json()
            if (
                not path.startswith(("/interactions/", "/webhooks/"))
                and request.headers.get("Authorization") != f"Bot {self.token}"
            ):
                raise _Refused(401, {"message": "401: Unauthorized", "code": 0})
            result, headers = await self._route(request.method, parts, call.body or {}, call)
        except _Refused as refused:
            call.status, call.code = refused.status, refused.body.get("code")
            return _json(refused.body, refused.status, refused.headers)
        if self.on_call is not None:
            self.on_call(call)
        if result is None:
            call.status = 204
            return web.Response(status=204, headers=headers)
        return _json(result, 200, headers)

    async def _route(
        self, method: str, parts: list[str], body: Json, call: Call
    ) -> tuple[Any, dict[str, str]]:
        match method, parts:
            case "GET", ["users", "@me"]:
                return self.bot.user(), {}
            case "GET", ["oauth2", "applications", "@me"]:
                return self._application(), {}
            case "GET", ["gateway", *_]:
                return {
                    "url": self.gateway_url,
                    "shards": 1,
                    "session_start_limit": {
                        "total": 1000,
                        "remaining": 1000,
                        "reset_after": 0,
                        "max_concurrency": 1,
                    },
                }, {}
            case "GET", ["channels", channel_id]:
                return self._channel(channel_id).payload(), {}
            case "DELETE", ["channels", channel_id]:
                return self.channels.pop(self._channel(channel_id).id).payload(), {}
            case "GET", ["channels", channel_id, "messages"]:
                return self._history(channel_id, call), {}
            case "POST", ["channels", channel_id, "messages"]:
                return await self._create_message(channel_id, body, call.files)
            case "PATCH", ["channels", channel_id, "messages", message_id]:
                return self._edit_message(channel_id, message_id, body)
            case "GET", ["channels", channel_id, "messages", message_id]:
                message = self._message(channel_id, message_id)
                return message.payload(self._channel(channel_id).guild_id), {}
            case "POST", ["channels", channel_id, "messages", message_id, "threads"]:
                return await self._thread_from_message(channel_id, message_id, body), {}
            case "POST", ["channels", channel_id, "threads"]:
                return await self._thread(channel_id, self.new_id(), body), {}
            case "PUT", ["channels", channel_id, "messages", message_id, "reactions", emoji, "@me"]:
                self._message(channel_id, message_id)
                self.reactions.append((message_id, emoji))
                return None, {}
            case "POST", ["interactions", interaction_id, token, "callback"]:
                return self._callback(interaction_id, token, body), {}
            case "POST", ["webhooks", _, token]:
                return self._followup(token, body), {}
            case "PATCH", ["webhooks", _, token, "messages", "@original"]:
                return self._edit_original(token, body), {}
            case "GET", ["webhooks", _, token, "messages", "@original"]:
                interaction = self._by_token(token)
                if interaction.original is None:
                    raise _Refused(404, {"message": "Unknown Message", "code": 10008})
                return interaction.original.payload(self.guild_id), {}
            case "PUT", ["applications", _, "commands"]:
                return self._register(None, body), {}
            case "PUT", ["applications", _, "guilds", guild_id, "commands"]:
                return self._register(guild_id, body), {}
        raise _Refused(404, {"message": "404: Not Found", "code": 0})

    def _application(self) -> Json:
        return {
            "id": self.application_id,
            "name": "loopbridge",
            "icon": None,
            "description": "",
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": {"id": "1", "username": "owner", "discriminator": "0", "avatar": None},
            "verify_key": "0" * 64,
            "flags": 0,
            "summary": "",
            "team": None,
            "interactions_endpoint_url": None,
        }

    def _history(self, channel_id: str, call: Call) -> list[Json]:
        channel = self._channel(channel_id)
        query = call.query
        limit = int(query.get("limit", "50"))
        if not 1 <= limit <= HISTORY_LIMIT:
            raise _form_error("limit", "NUMBER_TYPE_MAX", "Must be between 1 and 100.")
        found = [m for m in self.visible(channel_id) if m.only_for is None]
        if "before" in query:
            found = [m for m in found if int(m.id) < int(query["before"])]
        found.sort(key=lambda m: int(m.id), reverse=True)
        return [m.payload(channel.guild_id) for m in found[:limit]]

    def _channel(self, channel_id: str) -> Channel:
        channel = self.channels.get(channel_id)
        if channel is None:
            raise _Refused(404, {"message": "Unknown Channel", "code": 10003})
        return channel

    def _message(self, channel_id: str, message_id: str) -> Message:
        message = self.messages.get(message_id)
        if message is None or message.channel_id != channel_id:
            raise _Refused(404, {"message": "Unknown Message", "code": 10008})
        return message

    # ---- messages ------------------------------------------------------------------------

    async def _create_message(
        self, channel_id: str, body: Json, files: list[tuple[str, bytes]]
    ) -> tuple[Json, dict[str, str]]:
        channel = self._channel(channel_id)
        content, components, embeds = _checked(body, None, files)
        headers = self._take_write(channel_id, "post")
        message = Message(
            self.new_id(), channel_id, self.bot, content, components, embeds, cdn=self.url
        )
        message.attachments = [(self.new_id(), name, data) for name, data in files]
        self._show(message)
        self.messages[message.id] = message
        # Discord tells the bot about its own messages too: it must ignore them.
        await self._dispatch_message(message, channel, wait=False)
        return message.payload(channel.guild_id), headers

    def _edit_message(
        self, channel_id: str, message_id: str, body: Json
    ) -> tuple[Json, dict[str, str]]:
        message = self._message(channel_id, message_id)
        if not message.bot:
            raise _Refused(
                403, {"message": "Cannot edit a message authored by another user", "code": 50005}
            )
        content, components, embeds = _checked(body, message)
        headers = self._take_write(channel_id, "edit")
        message.content, message.components, message.embeds = content, components, embeds
        message.edits.append(time.monotonic())
        self._show(message)
        return message.payload(self._channel(channel_id).guild_id), headers

    def _show(self, message: Message) -> None:
        message.ever.update(message.custom_ids())
        if not message.shown or message.shown[-1][1] != message.content:
            message.shown.append((time.monotonic(), message.content))

    def _take_write(self, channel_id: str, kind: str) -> dict[str, str]:
        """Counts a post or an edit in a channel against its budget; refuses a burst."""
        now = time.monotonic()
        window = self._writes.setdefault((channel_id, kind), deque())
        while window and now - window[0] >= self.window:
            window.popleft()
        reset_after = (window[0] + self.window - now) if window else self.window
        headers = {
            "X-RateLimit-Limit": str(self.budget),
            "X-RateLimit-Bucket": f"{kind}-{channel_id}",
            "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
        }
        if len(window) >= self.budget:
            raise _Refused(
                429,
                {
                    "message": "You are being rate limited.",
                    "retry_after": round(reset_after, 3),
                    "global": False,
                },
                headers
                | {
                    "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Scope": "user",
                    "Retry-After": str(math.ceil(reset_after)),
                    "Via": "1.1 google",
                },
            )
        window.append(now)
        if not self.announce:
            return {}
        return headers | {"X-RateLimit-Remaining": str(self.budget - len(window))}

    async def _thread_from_message(self, channel_id: str, message_id: str, body: Json) -> Json:
        self._message(channel_id, message_id)
        if message_id in self.channels:
            raise _Refused(
                400,
                {"message": "A thread has already been created for this message", "code": 160004},
            )
        return await self._thread(channel_id, message_id, body)

    async def _thread(self, channel_id: str, thread_id: str, body: Json) -> Json:
        parent = self._channel(channel_id)
        name = str(body.get("name") or "")
        if not 1 <= len(name) <= 100:
            raise _form_error(
                "name", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
            )
        if parent.type != TEXT_CHANNEL:
            raise _Refused(
                400, {"message": "Cannot execute action on this channel type", "code": 50024}
            )
        thread = Channel(thread_id, PUBLIC_THREAD, name, parent.guild_id, parent.id, self.bot.id)
        self.channels[thread.id] = thread
        await self.dispatch(
            "THREAD_CREATE", {**thread.payload(), "newly_created": True}, wait=False
        )
        return thread.payload()

    # ---- interactions --------------------------------------------------------------------

    def _by_token(self, token: str) -> Interaction:
        for interaction in self.interactions.values():
            if interaction.token == token:
                return interaction
        raise _Refused(404, {"message": "Unknown Webhook", "code": 10015})

    def _callback(self, interaction_id: str, token: str, body: Json) -> Json:
        interaction = self.interactions.get(interaction_id)
        if interaction is None or interaction.token != token:
            raise _Refused(404, {"message": "Unknown interaction", "code": 10062})
        if time.monotonic() - interaction.created > INTERACTION_DEADLINE:
            raise _Refused(404, {"message": "Unknown interaction", "code": 10062})
        if interaction.response_type is not None:
            raise _Refused(
                400, {"message": "Interaction has already been acknowledged.", "code": 40060}
            )
        kind = int(body["type"])
        data = body.get("data") or {}
        interaction.response_type = kind
        interaction.answered_at = time.monotonic()
        if kind in (MESSAGE_WITH_SOURCE, DEFERRED_MESSAGE):
            content, components, embeds = (
                _checked(data, None) if kind == MESSAGE_WITH_SOURCE else ("", [], [])
            )
            reply = Message(
                self.new_id(),
                interaction.channel_id,
                self.bot,
                content,
                components,
                embeds,
                loading=kind == DEFERRED_MESSAGE,
            )
            if int(data.get("flags") or 0) & EPHEMERAL:
                reply.only_for = interaction.user.id
                self.ephemerals.append(reply)
            self._show(reply)
            self.messages[reply.id] = reply
            interaction.original = reply
        elif kind in (DEFERRED_UPDATE, UPDATE_MESSAGE):
            if interaction.message is None:
                raise _Refused(400, {"message": "Interaction has no message", "code": 50035})
            interaction.original = interaction.message
            if kind == UPDATE_MESSAGE:
                self._update(interaction.message, data)
        else:
            raise _form_error("type", "BASE_TYPE_CHOICES", f"Value {kind} is not supported")
        answer: Json = {
            "interaction": {"id": interaction.id, "type": interaction.type},
            "resource": {"type": kind},
        }
        if interaction.original is not None and kind != DEFERRED_UPDATE:
            answer["interaction"]["response_message_id"] = interaction.original.id
            answer["resource"]["message"] = interaction.original.payload(self.guild_id)
        return answer

    def _update(self, message: Message, data: Json) -> None:
        content, components, embeds = _checked(data, message)
        message.content, message.components, message.embeds = content, components, embeds
        message.edits.append(time.monotonic())
        self._show(message)

    def _followup(self, token: str, body: Json) -> Json:
        interaction = self._by_token(token)
        if interaction.response_type is None:
            raise _Refused(404, {"message": "Unknown Webhook", "code": 10015})
        original = interaction.original
        if interaction.response_type == DEFERRED_MESSAGE and original and original.loading:
            # The first followup of a "thinking" answer is that answer.
            self._update(original, body)
            original.loading = False
            return original.payload(self.guild_id)
        content, components, embeds = _checked(body, None)
        message = Message(
            self.new_id(), interaction.channel_id, self.bot, content, components, embeds
        )
        if int(body.get("flags") or 0) & EPHEMERAL:
            message.only_for = interaction.user.id
            self.ephemerals.append(message)
        self._show(message)
        self.messages[message.id] = message
        return message.payload(self.guild_id)

    def _edit_original(self, token: str, body: Json) -> Json:
        interaction = self._by_token(token)
        original = interaction.original
        if original is None:
            raise _Refused(404, {"message": "Unknown Message", "code": 10008})
        self._update(original, body)
        original.loading = False
        return original.payload(self.guild_id)

    def _register(self, guild_id: str | None, body: Any) -> list[Json]:
        if not isinstance(body, list):
            raise _form_error("commands", "LIST_TYPE_CONVERT", "Must be a list")
        registered = []
        for command in body:
            name = str(command.get("name", ""))
            if not name or len(name) > 32 or name.lower() != name:
                raise _form_error("0.name", "APPLICATION_COMMAND_INVALID_NAME", "Invalid name")
            registered.append(
                {
                    **command,
                    "id": self.new_id(),
                    "application_id": self.application_id,
                    "guild_id": guild_id,
                    "version": "1",
                    "default_member_permissions": None,
                    "type": command.get("type", 1),
                }
            )
        self.commands[guild_id] = registered
        return registered


def _is_message_write(call: Call) -> bool:
    parts = call.path.strip("/").split("/")
    return (
        parts[0] == "channels"
        and len(parts) in (3, 4)
        and parts[2] == "messages"
        and (call.method in ("POST", "PATCH"))
    )


async def _multipart(request: web.Request) -> tuple[Json, list[tuple[str, bytes]]]:
    """A message with files: its JSON in `payload_json`, each file in a part of its own."""
    body: Json = {}
    files: list[tuple[str, bytes]] = []
    async for part in await request.multipart():
        if not isinstance(part, BodyPartReader):
            raise _form_error("files", "BASE_TYPE_BAD", "Nested multipart is not accepted.")
        if part.name == "payload_json":
            body = json.loads(await part.text())
        elif part.filename:
            files.append((part.filename, bytes(await part.read())))
    if len(files) > ATTACHMENTS_LIMIT:
        raise _form_error("files", "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
    if sum(len(data) for _, data in files) > ATTACHMENT_BYTES_LIMIT:
        raise _Refused(413, {"message": "Request entity too large", "code": 40005})
    return body, files


def _checked(
    body: Json, current: Message | None, files: Sequence[tuple[str, bytes]] = ()
) -> tuple[str, list[Json], list[Json]]:
    """Content, components and embeds of a create or edit, as Discord would refuse them."""
    # An edit leaves what it does not name as it was.
    content = body.get("content", current.content if current else "")
    content = "" if content is None else str(content)
    components = body.get("components", current.components if current else [])
    embeds = body.get("embeds", current.embeds if current else [])
    components, embeds = components or [], embeds or []
    if len(content) > CONTENT_LIMIT:
        raise _form_error(
            "content", "BASE_TYPE_MAX_LENGTH", f"Must be {CONTENT_LIMIT} or fewer in length."
        )
    if not content.strip() and not components and not embeds and not files:
        raise _Refused(400, {"message": "Cannot send an empty message", "code": 50006})
    for index, embed in enumerate(embeds):
        if len(str(embed.get("description") or "")) > 4096:
            raise _form_error(
                f"embeds.{index}.description",
                "BASE_TYPE_MAX_LENGTH",
                "Must be 4096 or fewer in length.",
            )
    _check_components(components)
    return content, components, embeds


def _check_components(rows: list[Json]) -> None:
    if len(rows) > ROWS_LIMIT:
        raise _form_error(
            "components", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 5 in length."
        )
    seen: set[str] = set()
    for r, row in enumerate(rows):
        items = row.get("components") or []
        if row.get("type") != ACTION_ROW or not 1 <= len(items) <= ROW_BUTTONS:
            raise _form_error(f"components.{r}", "BASE_TYPE_BAD_LENGTH", "Invalid action row")
        selects = [item for item in items if item.get("type") == STRING_SELECT]
        if selects and len(items) > 1:
            raise _form_error(
                f"components.{r}",
                "COMPONENT_LAYOUT_WIDTH_EXCEEDED",
                "A select menu must be alone in its row",
            )
        for i, item in enumerate(items):
            where = f"components.{r}.components.{i}"
            custom_id = str(item.get("custom_id") or "")
            if not custom_id or len(custom_id) > CUSTOM_ID_LIMIT:
                raise _form_error(
                    f"{where}.custom_id",
                    "BASE_TYPE_BAD_LENGTH",
                    f"Must be between 1 and {CUSTOM_ID_LIMIT} in length.",
                )
            if custom_id in seen:
                raise _form_error(
                    f"{where}.custom_id",
                    "COMPONENT_CUSTOM_ID_DUPLICATED",
                    "Component custom id cannot be duplicated",
                )
            seen.add(custom_id)
            label = str(item.get("label") or "")
            if item.get("type") == BUTTON and len(label) > BUTTON_LABEL_LIMIT:
                raise _form_error(
                    f"{where}.label",
                    "BASE_TYPE_MAX_LENGTH",
                    f"Must be {BUTTON_LABEL_LIMIT} or fewer in length.",
                )
            if item.get("type") == STRING_SELECT:
                options = item.get("options") or []
                if not 1 <= len(options) <= SELECT_OPTIONS_LIMIT:
                    raise _form_error(
                        f"{where}.options",
                        "BASE_TYPE_BAD_LENGTH",
                        "Must be between 1 and 25 in length.",
                    )
                for option in options:
                    if (
                        max(
                            len(str(option.get(key) or ""))
                            for key in ("label", "value", "description")
                        )
                        > SELECT_TEXT_LIMIT
                    ):
                        raise _form_error(
                            f"{where}.options",
                            "BASE_TYPE_MAX_LENGTH",
                            "Must be 100 or fewer in length.",
                        )


def _json(body: Any, status: int, headers: dict[str, str]) -> web.Response:
    # discord.py reads a body as JSON only when Content-Type is exactly application/json.
    return web.Response(
        body=json.dumps(body).encode(),
        status=status,
        headers={**headers, "Content-Type": "application/json"},
    )
