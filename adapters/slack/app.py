"""The Slack adapter: a slack-bolt AsyncApp whose events become loop turns.

- A mention in a channel starts (or continues) the loop of that message's
  thread; later replies in a bound thread go to the loop without a mention; a
  direct message thread works the same. Bots, this one included, are ignored.
- Clicks on the adapter's buttons are acknowledged at once and carried out in
  the background; a click by someone who may not decide gets a private answer.

Everything platform-neutral (binding, policy, rendering, idempotency) lives in
`adapters.conversations`; this module only translates Slack to and from it.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Awaitable
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.app.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncConnectionErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from adapters.actions import Action
from adapters.binding import Binding, ConversationKey
from adapters.clicks import click
from adapters.conversations import Decision, IncomingMessage
from adapters.policy import Actor
from adapters.shell import AdapterShell
from adapters.slack.blocks import resolved_blocks, selected_answers
from adapters.slack.chat import SlackChat
from adapters.slack.mrkdwn import escape, from_slack
from adapters.slack.settings import SlackSettings
from adapters.slack.thread import NativeStreaming, SlackThread
from adapters.slack.web import CountingRateLimitHandler, CountingWebClient
from adapters.startup import PlatformRefused, PlatformUnreachable, unreachable
from adapters.views import OutcomeMarks
from bridge.client import LoopClient

log = logging.getLogger(__name__)

PLATFORM = "slack"
# Message subtypes that are a person writing; edits, joins and bot posts are not.
PERSON_SUBTYPES = frozenset({None, "file_share", "thread_broadcast"})
ACTION_IDS = re.compile(r"^lb_")
TIMESTAMP = re.compile(r"[0-9]{1,12}")  # seconds since 1970, in ASCII digits only
RATE_LIMIT_RETRIES = 3
NOT_ALLOWED_TO_WRITE = "You are not allowed to talk to the agent here."
# Where a message event names its writer (`user_profile`), best first.
NAME_FIELDS = ("display_name", "real_name", "name")
# Slack's answers at start that say a token or the app's setup is wrong (not a hiccup).
REFUSALS = frozenset(
    {
        "invalid_auth",
        "not_authed",
        "account_inactive",
        "token_revoked",
        "token_expired",
        "not_allowed_token_type",
        "missing_scope",
        "no_permission",
        "team_access_not_granted",
        "ekm_access_denied",
        "org_login_required",
        "invalid_token",
    }
)
T = TypeVar("T")


class SlackAdapter(AdapterShell):
    """Runs one Slack app against one Loop API client (`start`, then `stop`)."""

    platform = PLATFORM
    outcome_marks = OutcomeMarks(
        ":white_check_mark:",
        ":no_entry_sign:",
        ":ballot_box_with_check:",
        bold=lambda text: f"*{escape(text)}*",
    )

    def __init__(
        self, settings: SlackSettings, client: LoopClient, *, logger: logging.Logger | None = None
    ) -> None:
        if settings.bot_token is None:
            raise ValueError("LOOPBRIDGE_SLACK_BOT_TOKEN is not set")
        super().__init__(settings, client)
        self.settings = settings
        self.web = CountingWebClient(
            token=settings.bot_token.get_secret_value(),
            base_url=settings.api_url or AsyncWebClient.BASE_URL,
            # slack-sdk waits out a 429's Retry-After and tries again.
            retry_handlers=[
                AsyncConnectionErrorRetryHandler(),
                CountingRateLimitHandler(max_retry_count=RATE_LIMIT_RETRIES),
            ],
        )
        http = settings.mode == "http"
        secret = settings.signing_secret.get_secret_value() if settings.signing_secret else ""
        if http and not secret:
            raise ValueError("HTTP mode needs LOOPBRIDGE_SLACK_SIGNING_SECRET")
        self.app = AsyncApp(
            client=self.web,
            signing_secret=secret,
            request_verification_enabled=http,
            logger=logger,
        )
        # Thread history, names, files in and out (issue 10): adapters/slack/chat.py.
        self.chat = SlackChat(self.web, settings.bot_token.get_secret_value(), settings.file_limit)
        self.native = NativeStreaming(settings.streaming == "native")
        self.bot_user_id = ""
        self.team_id = ""
        self._socket: AsyncSocketModeHandler | None = None
        self._runner: web.AppRunner | None = None
        self.http_port: int | None = None
        self._register()

    # ---- running -------------------------------------------------------------------------

    async def _connect(self) -> None:
        identity = await self._reach(self.web.auth_test(), "LOOPBRIDGE_SLACK_BOT_TOKEN")
        self.bot_user_id = str(identity["user_id"])
        self.team_id = str(identity.get("team_id") or "")
        if self.settings.mode == "socket":
            if self.settings.app_token is None:
                raise ValueError("Socket Mode needs LOOPBRIDGE_SLACK_APP_TOKEN")
            self._socket = AsyncSocketModeHandler(
                self.app, self.settings.app_token.get_secret_value(), web_client=self.web
            )
            connecting = self._socket.connect_async()  # type: ignore[no-untyped-call]  # untyped in bolt
            await self._reach(connecting, "LOOPBRIDGE_SLACK_APP_TOKEN")
        else:
            events = self.app.web_app(path=self.settings.http_path)
            events.middlewares.append(_plain_timestamp)
            self._runner = web.AppRunner(events)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.settings.http_host, self.settings.http_port)
            await site.start()
            server = getattr(site, "_server", None)
            sockets = getattr(server, "sockets", None) or []
            self.http_port = sockets[0].getsockname()[1] if sockets else self.settings.http_port
        log.info("Slack adapter connected as %s (%s mode)", self.bot_user_id, self.settings.mode)

    async def _reach(self, call: Awaitable[T], token_setting: str) -> T:
        try:
            return await call
        except SlackApiError as exc:
            error = str(exc.response.get("error") or exc.response.status_code)
            if error in REFUSALS:
                raise PlatformRefused(f"Slack refused {token_setting} ({error})") from None
            raise PlatformUnreachable(f"Slack answered {error}") from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise unreachable("Slack", self.web.base_url, exc) from None

    async def _stop_listening(self) -> None:
        """Disconnect (the Web API client still makes the last edits of turns in flight)."""
        if self._socket is not None:
            with contextlib.suppress(Exception):
                await self._socket.close_async()  # type: ignore[no-untyped-call]  # untyped in bolt
            self._socket = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _disconnect(self) -> None:
        await self.chat.aclose()  # after the turns in flight posted their files

    # ---- listeners -----------------------------------------------------------------------

    def _register(self) -> None:
        async def on_event(body: dict[str, Any], event: dict[str, Any]) -> None:
            # Bolt has acknowledged the event already; the turn runs on its own.
            incoming = self.incoming(event, str(body.get("team_id") or self.team_id))
            if incoming is not None:
                self.spawn(self._run_turn(incoming, event))

        async def on_action(ack: Any, body: dict[str, Any], action: dict[str, Any]) -> None:
            await ack()
            self.spawn(self._click(body, action))

        self.app.event("app_mention")(on_event)
        self.app.event("message")(on_event)
        self.app.action(ACTION_IDS)(on_action)

    def incoming(self, event: dict[str, Any], team_id: str) -> IncomingMessage | None:
        """A person's Slack message as the neutral part sees it, or None to ignore it."""
        user = event.get("user")
        if (
            not user
            or event.get("bot_id")
            or event.get("subtype") not in PERSON_SUBTYPES
            or user == self.bot_user_id
        ):
            return None
        channel = str(event["channel"])
        ts = str(event["ts"])
        mention = f"<@{self.bot_user_id}>"
        raw = str(event.get("text") or "")
        direct = event.get("channel_type") == "im" or channel.startswith("D")
        key = ConversationKey(PLATFORM, team_id, channel, str(event.get("thread_ts") or ts))
        text = from_slack(raw.replace(mention, " ")).strip()
        profile = event.get("user_profile") or {}
        name = next((str(profile[k]) for k in NAME_FIELDS if profile.get(k)), "")
        return IncomingMessage(
            key, ts, Actor(str(user), name=name), text, mentioned=mention in raw, direct=direct
        )

    async def _run_turn(self, incoming: IncomingMessage, event: dict[str, Any]) -> None:
        incoming = await self.chat.enrich(incoming, event)  # name, files, thread extras

        def surface(binding: Binding, message: IncomingMessage) -> SlackThread:
            return self.thread(
                message.key.channel,
                message.key.thread,
                message.author.user_id,
                team_id=message.key.workspace,
                direct=message.direct,
            )

        result = await self.conversations.handle(
            incoming, surface, background=lambda binding: surface(binding, incoming)
        )
        self.results.append(result)
        if result.handled == "not_allowed" and (incoming.mentioned or incoming.direct):
            await self._tell(
                incoming.key.channel,
                incoming.author.user_id,
                incoming.key.thread,
                NOT_ALLOWED_TO_WRITE,
            )
        elif result.handled == "refused":
            # A spent budget: only the person who wrote sees why, in the thread.
            await self._tell(
                incoming.key.channel, incoming.author.user_id, incoming.key.thread, result.text
            )

    def thread(
        self,
        channel: str,
        thread_ts: str,
        user_id: str,
        *,
        team_id: str = "",
        direct: bool | None = None,
    ) -> SlackThread:
        """Where a turn is shown: a thread, streamed to `user_id` (Slack wants a recipient)."""
        return SlackThread(
            self.web,
            self.settings,
            channel=channel,
            thread_ts=thread_ts,
            team_id=team_id or self.team_id,
            user_id=user_id,
            direct=channel.startswith("D") if direct is None else direct,
            native=self.native,
        )

    # ---- clicks --------------------------------------------------------------------------

    async def _click(self, body: dict[str, Any], element: dict[str, Any]) -> None:
        value = str(element.get("value") or "")
        encoded, _, label = value.partition("\n")
        action = Action.decode(encoded)
        if action is None:
            return  # a select menu changing: its value is read on Submit
        actor = Actor(str(body["user"]["id"]))
        answers: dict[str, str | list[str]] | None = None
        if action.verb == "answer":
            answers = {action.arg: label}
        elif action.verb == "submit":
            answers = selected_answers((body.get("state") or {}).get("values") or {})
        channel = str((body.get("channel") or {}).get("id") or body["container"]["channel_id"])
        message = body.get("message") or {}
        thread = str(message.get("thread_ts") or message.get("ts") or "")
        team = str((body.get("team") or {}).get("id") or body["user"].get("team_id") or "")

        async def show_outcome(decision: Decision, line: str) -> None:
            if decision.outcome in ("not_allowed", "gone", "failed"):
                await self._tell(channel, actor.user_id, thread, decision.message)
            elif decision.outcome == "answered":
                await self._show_outcome(channel, message, line)

        await click(
            self.conversations,
            actor,
            action,
            answers,
            marks=self.outcome_marks,
            show_outcome=show_outcome,
            rest_on=lambda: self.thread(channel, thread, actor.user_id, team_id=team),
        )

    async def _show_outcome(self, channel: str, message: dict[str, Any], outcome: str) -> None:
        blocks = resolved_blocks(list(message.get("blocks") or []), outcome)
        try:
            await self.web.chat_update(
                channel=channel, ts=str(message["ts"]), text=outcome, blocks=blocks
            )
        except SlackApiError as exc:
            log.warning("could not show a choice's outcome: %s", exc.response.get("error"))

    async def _tell(self, channel: str, user: str, thread: str, text: str) -> None:
        """A private answer that only `user` sees."""
        try:
            await self.web.chat_postEphemeral(
                channel=channel, user=user, text=text, thread_ts=thread or None
            )
        except SlackApiError as exc:
            log.warning("could not answer %s privately: %s", user, exc.response.get("error"))


@web.middleware
async def _plain_timestamp(request: web.Request, handler: Any) -> web.StreamResponse:
    """A request whose `X-Slack-Request-Timestamp` is not a plain number is not from Slack:
    401 here, because Slack's verifier reads it with `int()` and fails with a 500."""
    stamp = request.headers.get("X-Slack-Request-Timestamp")
    if stamp is not None and not TIMESTAMP.fullmatch(stamp):
        return web.json_response({"error": "invalid_timestamp"}, status=401)
    response: web.StreamResponse = await handler(request)
    return response


__all__ = ["Decision", "SlackAdapter"]
