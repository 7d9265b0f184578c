"""A fake Slack on 127.0.0.1 that the real slack-sdk and slack-bolt talk to.

It serves the Web API methods the adapter calls, a Socket Mode websocket (its
URL comes from `apps.connections.open`, as on Slack), and it can instead push
events and clicks to an app in HTTP mode, signed as Slack signs them.

It enforces Slack's limits, so that a test fails when the adapter breaks them:
- `msg_too_long` for `text` over 4,000 characters, and for a `chat.update`
  whose mrkdwn (text, sections) would exceed 4,000 bytes; `invalid_blocks` for a
  section over 3,000 characters, a `markdown` block over 12,000 or empty, or
  more than 50 blocks; `msg_blocks_too_long` when a message's `markdown` blocks
  hold more than 12,000 characters together (Slack's cumulative limit); a
  `markdown` block keeps no `block_id`, as on Slack;
- 429 with `Retry-After` for a burst of `chat.update` on one message (two less
  than `update_gap` apart) and of `chat.postMessage` in one channel (a token
  bucket: `post_burst` at once, refilled at `post_rate` per second);
- native streams need `thread_ts`, and a recipient outside DMs; they go stale
  after `stream_ttl` seconds, and can be switched off (`native_streaming`).

Files, history and people, as Slack has them:
- a person's message may carry files; each is served at its `url_private` only with
  the bot token (without it, a redirect to an HTML sign-in page, as Slack does);
- `files.getUploadURLExternal` (length at most `file_limit`, Slack's 1 GB by default),
  a raw POST to the upload URL (its length must match), then
  `files.completeUploadExternal` shares the file in a thread with its comment;
- `conversations.replies` gives a thread oldest first, at most 1,000 a call
  (`latest`/`inclusive` as on Slack); `users.info` gives a person's profile.

Every call is recorded (`calls`), and `thread()` / `answer_text()` give what a
person would see in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientSession, WSMsgType, web

from tests.fakes.serving import serve

TEXT_LIMIT = 4000
UPDATE_BYTES_LIMIT = 4000
SECTION_LIMIT = 3000
MARKDOWN_LIMIT = 12_000
BLOCKS_LIMIT = 50
STREAM_TEXT_LIMIT = 12_000
REPLIES_LIMIT = 1000
FILE_LIMIT = 1024 * 1024 * 1024


_TS = itertools.count(1)


@dataclass
class Call:
    at: float
    method: str
    args: dict[str, Any]
    status: int = 200
    error: str | None = None


@dataclass
class Message:
    channel: str
    ts: str
    user: str
    text: str = ""
    blocks: list[dict[str, Any]] = field(default_factory=list)
    thread_ts: str | None = None
    bot: bool = False
    # A natively streamed message: its Markdown, as Slack renders it.
    markdown: str | None = None
    streaming: bool = False
    stream_started: float = 0.0
    deleted: bool = False
    updates: list[float] = field(default_factory=list)
    # When what a person sees of it last changed (monotonic clock).
    changed: float = field(default_factory=time.monotonic)
    # Files shared with it: Slack's file objects (with `content` for tests to read).
    files: list[dict[str, Any]] = field(default_factory=list)
    # Another app's message: its name (it has no user, only a bot profile).
    bot_name: str | None = None

    def as_event_message(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": "message",
            "ts": self.ts,
            "text": self.text,
            "blocks": self.blocks,
            "user": self.user,
        }
        if self.thread_ts:
            body["thread_ts"] = self.thread_ts
        if self.bot:
            body["bot_id"] = FakeSlack.bot_id
        if self.files:
            body["files"] = [{k: v for k, v in f.items() if k != "content"} for f in self.files]
        return body

    def block_text(self, prefix: str) -> str:
        return "\n".join(
            block["text"]["text"]
            for block in self.blocks
            if block.get("type") == "section" and str(block.get("block_id", "")).startswith(prefix)
        )

    @property
    def answer(self) -> str:
        """The answer's Markdown a person sees in this message (streamed, or in blocks)."""
        if self.markdown is not None:
            return self.markdown
        return "\n".join(block["text"] for block in self.blocks if block.get("type") == "markdown")

    @property
    def has_buttons(self) -> bool:
        return any(block.get("type") == "actions" for block in self.blocks)

    def context_text(self) -> str:
        return "\n".join(
            element.get("text", "")
            for block in self.blocks
            if block.get("type") == "context"
            for element in block.get("elements", [])
        )

    def button(self, action_id: str) -> dict[str, Any]:
        for block in self.blocks:
            for element in block.get("elements", []) if block.get("type") == "actions" else []:
                if element.get("action_id") == action_id:
                    return {**element, "block_id": block.get("block_id")}
        raise KeyError(f"no button {action_id} in {self.blocks}")


class FakeSlack:
    team_id = "T0FAKE"
    bot_user_id = "U0BOT"
    bot_id = "B0BOT"
    app_id = "A0FAKE"
    bot_token = "xoxb-fake-bot-token"
    app_token = "xapp-fake-app-token"
    signing_secret = "fake-signing-secret"

    def __init__(
        self,
        *,
        update_gap: float = 0.8,
        post_burst: float = 8,
        post_rate: float = 1.0,
        stream_ttl: float = 300.0,
        native_streaming: bool = True,
        file_limit: int = FILE_LIMIT,
    ) -> None:
        self.file_limit = file_limit
        # People's display names (users.info), by user id.
        self.people: dict[str, str] = {}
        # Uploaded or attached files by id: the Slack file object and its bytes.
        self.files: dict[str, dict[str, Any]] = {}
        self._uploads: dict[str, dict[str, Any]] = {}
        self.update_gap = update_gap
        self.post_burst = post_burst
        self.post_rate = post_rate
        self.stream_ttl = stream_ttl
        self.native_streaming = native_streaming
        self.calls: list[Call] = []
        self.messages: dict[tuple[str, str], Message] = {}
        self.ephemerals: list[dict[str, Any]] = []
        self.acks: list[str] = []
        self.http_target: str | None = None
        self.url = ""
        self._ids = itertools.count(1)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._sockets: list[web.WebSocketResponse] = []
        self.most_connections = 0  # Socket Mode connections open at once, at most
        self._connected = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._http: ClientSession | None = None

    # ---- running -------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/api/{method}", self._api)
        app.router.add_get("/api/{method}", self._api)  # slack-sdk reads with GET
        app.router.add_get("/socket", self._socket)
        app.router.add_get("/files-pri/{file_id}/{name}", self._download)
        app.router.add_get("/signin", self._signin)
        app.router.add_post("/upload/{upload_id}", self._upload)
        self._runner, self.url = await serve(app)
        return self.url

    @property
    def api_url(self) -> str:
        return f"{self.url}/api/"

    async def stop(self) -> None:
        for socket in list(self._sockets):
            with contextlib.suppress(Exception):
                await socket.close()
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_connected(self, seconds: float = 10) -> None:
        await asyncio.wait_for(self._connected.wait(), seconds)

    @property
    def connections(self) -> int:
        """Socket Mode connections open now."""
        return len(self._sockets)

    async def drop_socket(self) -> None:
        """Close every Socket Mode connection (the app is expected to reconnect)."""
        self._connected.clear()
        for socket in list(self._sockets):
            await socket.close()

    # ---- what people do --------------------------------------------------------------

    def new_ts(self) -> str:
        # One count for every fake in the process: Slack's ts are unique in a channel, and
        # tests that share one API server would otherwise reuse a message's idempotency key.
        return f"{int(time.time())}.{next(_TS):06d}"

    async def say(
        self,
        user: str,
        text: str,
        *,
        channel: str = "C0GENERAL",
        thread_ts: str | None = None,
        deliveries: int = 1,
        files: list[tuple[str, bytes, str]] = (),  # type: ignore[assignment]
    ) -> str:
        """A person writes; Slack sends `message` (and `app_mention` when the bot is named).
        `files` are (name, content, mimetype) attached to the message."""
        ts = self.new_ts()
        message = Message(channel, ts, user, text, thread_ts=thread_ts)
        message.files = [
            self.add_file(name, content, mimetype) for name, content, mimetype in files
        ]
        self.messages[(channel, ts)] = message
        event: dict[str, Any] = {
            "type": "message",
            "user": user,
            "text": text,
            "ts": ts,
            "channel": channel,
            "event_ts": ts,
            "team": self.team_id,
            "channel_type": "im" if channel.startswith("D") else "channel",
        }
        if thread_ts:
            event["thread_ts"] = thread_ts
        if message.files:
            event["subtype"] = "file_share"
            event["files"] = message.as_event_message()["files"]
        events = [event]
        if f"<@{self.bot_user_id}>" in text and not channel.startswith("D"):
            mention = {k: v for k, v in event.items() if k != "channel_type"}
            events.append({**mention, "type": "app_mention"})
        for event_body in events:
            event_id = f"Ev{next(self._ids):08d}"
            for attempt in range(deliveries):
                await self.deliver_event(event_body, event_id, retry=attempt)
        return ts

    def add_file(self, name: str, content: bytes, mimetype: str) -> dict[str, Any]:
        file_id = f"F{next(self._ids):08d}"
        url = f"{self.url}/files-pri/{file_id}/{name}"
        record = {
            "id": file_id,
            "name": name,
            "title": name,
            "mimetype": mimetype,
            "size": len(content),
            "mode": "hosted",
            "url_private": url,
            "url_private_download": url + "?download=1",
            "content": content,
        }
        self.files[file_id] = record
        return record

    def other_bot_says(
        self, channel: str, thread_ts: str, blocks: list[dict[str, Any]], name: str
    ) -> str:
        """Another app posts in a thread, its text only in blocks (no event is sent)."""
        message = Message(
            channel, self.new_ts(), "", "", blocks, thread_ts=thread_ts, bot_name=name
        )
        self.messages[(channel, message.ts)] = message
        return message.ts

    async def deliver_event(self, event: dict[str, Any], event_id: str, retry: int = 0) -> None:
        body = {
            "token": "fake-verification",
            "team_id": self.team_id,
            "api_app_id": self.app_id,
            "event": event,
            "type": "event_callback",
            "event_id": event_id,
            "event_time": int(time.time()),
            "authorizations": [
                {
                    "team_id": self.team_id,
                    "user_id": self.bot_user_id,
                    "is_bot": True,
                    "is_enterprise_install": False,
                }
            ],
        }
        await self._push("events_api", body, retry=retry)

    async def click(
        self,
        user: str,
        message: Message,
        action_id: str,
        *,
        selections: dict[str, list[str]] | None = None,
    ) -> None:
        """A person clicks a button of a message (with select menus set as given)."""
        button = message.button(action_id)
        values: dict[str, Any] = {}
        for block_id, labels in (selections or {}).items():
            block = next(b for b in message.blocks if b.get("block_id") == block_id)
            element = block["elements"][0]
            picked = [o for o in element["options"] if o["value"] in labels]
            state = (
                {"type": element["type"], "selected_options": picked}
                if element["type"].startswith("multi")
                else {"type": element["type"], "selected_option": picked[0]}
            )
            values[block_id] = {element["action_id"]: state}
        body = {
            "type": "block_actions",
            "user": {"id": user, "username": user.lower(), "team_id": self.team_id},
            "api_app_id": self.app_id,
            "token": "fake-verification",
            "container": {
                "type": "message",
                "message_ts": message.ts,
                "channel_id": message.channel,
                "is_ephemeral": False,
            },
            "trigger_id": f"trigger{next(self._ids)}",
            "team": {"id": self.team_id, "domain": "fake"},
            "channel": {"id": message.channel, "name": "general"},
            "message": {**message.as_event_message(), "type": "message"},
            "state": {"values": values},
            "response_url": f"{self.url}/response",
            "actions": [
                {
                    "action_id": button["action_id"],
                    "block_id": button["block_id"],
                    "text": button["text"],
                    "value": button.get("value", ""),
                    "type": button["type"],
                    "action_ts": self.new_ts(),
                }
            ],
        }
        await self._push("interactive", body)

    async def _push(self, kind: str, body: dict[str, Any], retry: int = 0) -> None:
        if self.http_target is not None:
            await self._post_signed(kind, body, retry)
            return
        await self.wait_connected()
        envelope = {
            "envelope_id": f"env{next(self._ids)}",
            "type": kind,
            "payload": body,
            "accepts_response_payload": kind == "interactive",
            "retry_attempt": retry,
            "retry_reason": "timeout" if retry else "",
        }
        await self._sockets[-1].send_str(json.dumps(envelope))

    async def _post_signed(self, kind: str, body: dict[str, Any], retry: int) -> None:
        if kind == "interactive":
            raw = "payload=" + urllib.parse.quote(json.dumps(body))
            content_type = "application/x-www-form-urlencoded"
        else:
            raw = json.dumps(body)
            content_type = "application/json"
        stamp = str(int(time.time()))
        digest = hmac.new(
            self.signing_secret.encode(), f"v0:{stamp}:{raw}".encode(), hashlib.sha256
        ).hexdigest()
        headers = {
            "Content-Type": content_type,
            "X-Slack-Request-Timestamp": stamp,
            "X-Slack-Signature": f"v0={digest}",
        }
        if retry:
            headers |= {"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"}
        if self._http is None:
            self._http = ClientSession()
        assert self.http_target is not None
        async with self._http.post(self.http_target, data=raw.encode(), headers=headers) as reply:
            self.acks.append(f"http {reply.status}")
            if reply.status != 200:
                raise AssertionError(f"the app answered {reply.status}: {await reply.text()}")

    # ---- what people see -----------------------------------------------------------------

    def thread(self, channel: str, thread_ts: str) -> list[Message]:
        """Every message of a thread, root first, as Slack orders them (by ts)."""
        found = [
            m
            for (c, _), m in self.messages.items()
            if c == channel and not m.deleted and (m.ts == thread_ts or m.thread_ts == thread_ts)
        ]
        return sorted(found, key=lambda m: _ts_key(m.ts))

    def bot_messages(self, channel: str, thread_ts: str) -> list[Message]:
        return [m for m in self.thread(channel, thread_ts) if m.bot]

    def answer_messages(self, channel: str, thread_ts: str) -> list[Message]:
        return [m for m in self.bot_messages(channel, thread_ts) if m.answer]

    def choice_messages(self, channel: str, thread_ts: str) -> list[Message]:
        return [m for m in self.bot_messages(channel, thread_ts) if m.block_text("lb_choice")]

    def methods(self, *names: str) -> list[Call]:
        return [call for call in self.calls if not names or call.method in names]

    # ---- the Web API -----------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.StreamResponse:
        method = request.match_info["method"]
        args = await _arguments(request)
        call = Call(time.monotonic(), method, args)
        self.calls.append(call)
        handler = getattr(self, "_m_" + method.replace(".", "_"), None)
        if handler is None:
            return self._fail(call, "unknown_method")
        token = request.headers.get("Authorization", "").removeprefix("Bearer ") or args.get(
            "token", ""
        )
        wanted = self.app_token if method == "apps.connections.open" else self.bot_token
        if token != wanted:
            return self._fail(call, "invalid_auth")
        try:
            result = handler(call, args)
        except _Refused as refused:
            return self._fail(call, refused.error, refused.status, refused.retry_after)
        return web.json_response({"ok": True, **result})

    def _fail(
        self, call: Call, error: str, status: int = 200, retry_after: int | None = None
    ) -> web.Response:
        call.status, call.error = status, error
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        return web.json_response({"ok": False, "error": error}, status=status, headers=headers)

    def _m_auth_test(self, call: Call, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "url": "https://fake.slack.com/",
            "team": "Fake",
            "user": "loopbridge",
            "team_id": self.team_id,
            "user_id": self.bot_user_id,
            "bot_id": self.bot_id,
            "is_enterprise_install": False,
        }

    def _m_users_info(self, call: Call, args: dict[str, Any]) -> dict[str, Any]:
        user = str(args.get("user") or "")
        if not user.startswith(("U", "W")):
            raise _Refused("user_not_found")
        name = self.people.get(user) or user.lower()  # everyone is in the workspace
        return {
            "user": {
                "id": user,
                "name": name.lower().replace(" ", "."),
                "real_name": name,
                "profile": {"display_name": name, "real_name": name},
            }
        }

    def _m_conversations_replies(self, call: Call, args: dict[str, Any]) -> dict[str, Any]:
        channel, ts = str(args.get("channel") or ""), str(args.get("ts") or "")
        limit = int(args.get("limit") or 1000)
        if not 1 <= limit <= REPLIES_LIMIT:
            raise _Refused("invalid_limit")
        found = self.thread(channel, ts)
        if not found:
            raise _Refused("thread_not_found")
        latest = args.get("latest")
        inclusive = str(args.get("inclusive", "")).lower() in ("1", "true")
        if latest:
            found = [
                m
                for m in found
                if _ts_key(m.ts) < _ts_key(str(latest)) or (inclusive and m.ts == latest)
            ]
        page = found[:limit]
        messages = []
        for message in page:
            body = message.as_event_message()
            name = message.bot_name
            if name is not None:  # another app's message: no user, a bot profile
                body.pop("user", None)
                body |= {
                    "bot_id": f"B{name.upper()}",
                    "subtype": "bot_message",
                    "bot_profile": {"name": name},
                }
            messages.append(body)
        return {"messages": messages, "has_more": len(found) > limit}

    def _m_files_getUploadURLExternal(self, call: Call, args: dict[str, Any]) -> dict[str, Any]:
        filename, length = str(args.get("filename") or ""), int(args.get("length") or 0)
        if not filename or length < 1:
            raise _Refused("invalid_arguments")
        if length > self.file_limit:
            raise _Refused("file_too_large")
        upload_id = f"U{next(self._ids):08d}"
        file_id = f"F{next(self._ids):08d}"
        self._uploads[upload_id] = {"id": file_id, "name": filename, "length": length}
        return {"upload_url": f"{self.url}/upload/{upload_id}", "file_id": file_id}

    def _m_files_completeUploadExternal(self, call: Call, args: dict[str, Any]) -> dict[str, Any]:
        files = args.get("files")
        files = json.loads(files) if isinstance(files, str) else files or []
        channel = str(args.get("channel_id") or "")
        done = []
        for item in files:
            record = self.files.get(item["id"])
            if record is None:
                raise _Refused("file_not_found")
            record["title"] = item.get("title") or record["name"]
            done.append(record)
        if channel:
            self._take_post_token(channel)
            message = Message(
                channel,
                self.new_ts(),
                self.bot_user_id,
                str(args.get("initial_comment") or ""),
                thread_ts=args.get("thread_ts"),
                bot=True,
            )
            message.files = done
            self.messages[(channel, message.ts)] = message
        return {"files": [{k: v for k, v in f.items() if k != "content"} for f in done]}

    def shared_files(self, channel: str, thread_ts: str) -> list[tuple[dict[str, Any], str]]:
        """Files the bot shared in a thread, each with its message's text (the caption)."""
        return [(f, m.text) for m in self.bot_messages(channel, thread_ts) for f in m.files]

    async def _download(self, request: web.Request) -> web.StreamResponse:
        record = self.files.get(request.match_info["file_id"])
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token != self.bot_token:
            # Slack answers a request without the token with its sign-in page.
            raise web.HTTPFound(f"{self.url}/signin")
        if record is None:
            return web.Response(status=404)
        return web.Response(body=record["content"], content_type=record["mimetype"])

    async def _signin(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            text="<html><body>Sign in to Slack</body></html>", content_type="text/html"
        )

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        upload = self._uploads.pop(request.match_info["upload_id"], None)
        if upload is None:
            return web.Response(status=404, text="unknown upload")
        content = await request.read()
        if len(content) != upload["length"]:
            return web.Response(status=400, text="length mismatch")
        mimetype = "application/octet-stream"
        self.files[upload["id"]] = {
            "id": upload["id"],
            "name": upload["name"],
            "title": upload["name"],
            "mimetype": mimetype,
            "size": len(content),
            "mode": "hosted",
            "content": content,
        }
        return web.Response(text="OK - " + str(len(content)))

    def _m_apps_connections_open(self, call: Call, args: dict[str, Any]) -> dict[str, Any]:
        ws = self.url.replace("http://", "ws://")
        return {"url": f"{ws}/socket?ticket={next(self._ids)}"}

    def _m_chat_postMessage(self, call: Call, args: dict[str, Any]) -> dict[str, Any]:
        channel = args["channel"]
        text, blocks = _check_content(args)
        self._take_post_token(channel)
        message = Message(
            channel,
            self.new_ts(),
            self.bot_user_id,
            text,
            blocks,
            thread_ts=args.get("thread_ts"),
            bot=True,
        )
        self.messages[(channel, message.ts)] = message
        return {"channel": channel, "ts": message.ts, "message": message.as_event_message()}

    def _m_chat_update(self, call: Call, args: dict[str, Any]) -> dict[str, Any]:
        message = self._message(args)
        if message.streaming:
            raise _Refused("message_is_streaming")
        text, blocks = _check_content(args)
        visible = (
            text
            if not blocks
            else "".join(b["text"]["text"] for b in blocks if b.get("type") == "section")
        )  # `markdown` blocks have limits of their own (see _check_content)
        if len(visible.encode()) > UPDATE_BYTES_LIMIT:
            raise _Refused("msg_too_long")
        now = time.monotonic()
        if message.updates and now - message.updates[-1] < self.update_gap:
            raise _Refused("ratelimited", status=429, retry_after=1)
        message.updates.append(now)
        message.text, message.blocks, message.markdown = text, blocks, None
        message.changed = now
        return {"channel": message.channel, "ts": message.ts, "text": text}

    def _m_chat_delete(self, call: Call, args: dict[str, Any]) -> dict[str, Any]:
        message = self._message(args)
        message.deleted = True
        return {"channel": message.channel, "ts": message.ts}

    def _m_chat_postEphemeral(self, call: Call, args: dict[str, Any]) -> dict[str, Any]:
        self.ephemerals.append(args)
        return {"message_ts": self.new_ts()}

    def _m_chat_startStream(self, call: Call, args: dict[str, Any]) -> dict[str, Any]:
        if not self.native_streaming:
            raise _Refused("missing_scope")
        channel = args["channel"]
        if not args.get("thread_ts"):
            raise _Refused("invalid_arguments")
        if not channel.startswith("D"):
            if not args.get("recipient_user_id"):
                raise _Refused("missing_recipient_user_id")
            if not args.get("recipient_team_id"):
                raise _Refused("missing_recipient_team_id")
        markdown = _stream_text(args)
        self._take_post_token(channel)
        message = Message(
            channel,
            self.new_ts(),
            self.bot_user_id,
            thread_ts=args["thread_ts"],
            bot=True,
            markdown=markdown,
            streaming=True,
            stream_started=time.monotonic(),
        )
        self.messages[(channel, message.ts)] = message
        return {"channel": channel, "ts": message.ts}

    def _m_chat_appendStream(self, call: Call, args: dict[str, Any]) -> dict[str, Any]:
        message = self._streaming(args)
        message.markdown = (message.markdown or "") + _stream_text(args, required=True)
        message.changed = time.monotonic()
        return {"channel": message.channel, "ts": message.ts}

    def _m_chat_stopStream(self, call: Call, args: dict[str, Any]) -> dict[str, Any]:
        message = self._streaming(args)
        message.markdown = (message.markdown or "") + _stream_text(args)
        if args.get("blocks"):
            message.blocks = _blocks(args)
        message.streaming = False
        message.changed = time.monotonic()
        return {"channel": message.channel, "ts": message.ts}

    def _message(self, args: dict[str, Any]) -> Message:
        message = self.messages.get((args.get("channel", ""), args.get("ts", "")))
        if message is None or message.deleted:
            raise _Refused("message_not_found")
        if not message.bot:
            raise _Refused("cant_update_message")
        return message

    def _streaming(self, args: dict[str, Any]) -> Message:
        message = self._message(args)
        if message.streaming and time.monotonic() - message.stream_started > self.stream_ttl:
            message.streaming = False
        if not message.streaming:
            raise _Refused("message_not_in_streaming_state")
        return message

    def _take_post_token(self, channel: str) -> None:
        now = time.monotonic()
        tokens, then = self._buckets.get(channel, (self.post_burst, now))
        tokens = min(self.post_burst, tokens + (now - then) * self.post_rate)
        if tokens < 1:
            self._buckets[channel] = (tokens, now)
            raise _Refused("ratelimited", status=429, retry_after=1)
        self._buckets[channel] = (tokens - 1, now)

    # ---- Socket Mode -----------------------------------------------------------------

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse(autoping=True)
        await socket.prepare(request)
        self._sockets.append(socket)
        self.most_connections = max(self.most_connections, len(self._sockets))
        await socket.send_str(
            json.dumps(
                {
                    "type": "hello",
                    "num_connections": len(self._sockets),
                    "connection_info": {"app_id": self.app_id},
                    "debug_info": {"host": "fake", "approximate_connection_time": 3600},
                }
            )
        )
        self._connected.set()
        try:
            async for frame in socket:
                if frame.type == WSMsgType.TEXT:
                    with contextlib.suppress(ValueError):
                        self.acks.append(json.loads(frame.data).get("envelope_id", ""))
        finally:
            self._sockets.remove(socket)
        return socket


class _Refused(Exception):
    def __init__(self, error: str, status: int = 200, retry_after: int | None = None) -> None:
        super().__init__(error)
        self.error = error
        self.status = status
        self.retry_after = retry_after


async def _arguments(request: web.Request) -> dict[str, Any]:
    args: dict[str, Any] = dict(request.query)
    if request.content_type == "application/json":
        body = await request.json() if request.can_read_body else {}
        args.update(body or {})
    elif request.can_read_body:
        args.update({key: value for key, value in (await request.post()).items()})
    return args


def _blocks(args: dict[str, Any]) -> list[dict[str, Any]]:
    blocks = args.get("blocks") or []
    return json.loads(blocks) if isinstance(blocks, str) else list(blocks)


def _check_content(args: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    text = str(args.get("text") or "")
    blocks = _blocks(args)
    if len(text) > TEXT_LIMIT:
        raise _Refused("msg_too_long")
    if len(blocks) > BLOCKS_LIMIT:
        raise _Refused("invalid_blocks")
    for block in blocks:
        if block.get("type") == "section" and len(block["text"]["text"]) > SECTION_LIMIT:
            raise _Refused("invalid_blocks")
        if block.get("type") == "section" and not block["text"]["text"].strip():
            raise _Refused("invalid_blocks")
        if block.get("type") == "markdown":
            markdown = block.get("text")
            if not isinstance(markdown, str) or not markdown.strip():
                raise _Refused("invalid_blocks")
            if len(markdown) > MARKDOWN_LIMIT:
                raise _Refused("invalid_blocks")
            block.pop("block_id", None)
    markdown_total = sum(len(b["text"]) for b in blocks if b.get("type") == "markdown")
    if markdown_total > MARKDOWN_LIMIT:
        raise _Refused("msg_blocks_too_long")
    if not text and not blocks:
        raise _Refused("no_text")
    return text, blocks


def _stream_text(args: dict[str, Any], required: bool = False) -> str:
    text = args.get("markdown_text")
    if text is None:
        if required:
            raise _Refused("invalid_arguments")
        return ""
    if len(text) > STREAM_TEXT_LIMIT:
        raise _Refused("msg_too_long")
    return str(text)


def _ts_key(ts: str) -> tuple[int, int]:
    seconds, _, serial = ts.partition(".")
    return int(serial), int(seconds)
