"""A Slack thread as the `Surface` a turn is rendered on.

Two ways to show a growing answer:

- native streaming (`chat.startStream` / `appendStream` / `stopStream`): Slack
  renders the Markdown itself and the text only grows. A streamed message
  cannot carry buttons while it streams, so the Stop button and tool activity
  live in a small control message of the turn.
- edits (`chat.postMessage` + `chat.update`): the message is Block Kit with the
  answer's Markdown in a `markdown` block (Slack renders it too), its tool
  activity and the Stop button.

A stream that fails (no scope for it, a missing recipient, a stale stream, any
error) is stopped and its message turned into an edited one, with its full text:
the answer is never lost to the fallback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack.blocks import (
    choice_blocks,
    context_block,
    controls_block,
    link_blocks,
    message_blocks,
    status_line,
)
from adapters.slack.mrkdwn import to_mrkdwn
from adapters.slack.settings import SlackSettings
from adapters.surface import MessageGone
from adapters.views import ChoiceView, MessageView, TurnState

log = logging.getLogger(__name__)

# Errors that say this app or workspace cannot stream at all: stop trying.
NO_STREAMING = frozenset(
    {
        "missing_scope",
        "not_allowed_token_type",
        "unknown_method",
        "not_authed",
        "invalid_auth",
        "no_permission",
        "access_denied",
        "feature_not_enabled",
        "method_deprecated",
        "team_access_not_granted",
    }
)
# A message someone deleted: editing it again cannot succeed.
GONE = frozenset({"message_not_found", "cant_update_message", "channel_not_found"})
# Slack drops a stream after about five minutes; switch to edits before that.
STREAM_STALE_AFTER = 270.0
# chat.appendStream takes at most 12,000 characters of markdown_text per call.
APPEND_LIMIT = 12_000


class NativeStreaming:
    """Whether to try native streams; turned off for good on an error that says never."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.reason: str | None = None

    def refused(self, error: str) -> None:
        if error in NO_STREAMING and self.enabled:
            self.enabled = False
            self.reason = error
            log.warning("Slack refused native streaming (%s): using chat.update from now on", error)


@dataclass
class _Stream:
    sent: str
    started_at: float


class SlackThread:
    """One turn's messages in one Slack thread."""

    def __init__(
        self,
        web: AsyncWebClient,
        settings: SlackSettings,
        *,
        channel: str,
        thread_ts: str,
        team_id: str,
        user_id: str,
        direct: bool,
        native: NativeStreaming,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.web = web
        self.channel = channel
        self.thread_ts = thread_ts
        self.team_id = team_id
        self.user_id = user_id
        self.direct = direct
        self.native = native
        self.clock = clock
        self.part_limit = settings.part_limit
        self.edit_interval = settings.edit_interval
        self._streams: dict[str, _Stream] = {}
        self._deleted: set[str] = set()
        self._control_ts: str | None = None
        self._control_shown: tuple[str, bool] | None = None
        self._control_at = 0.0
        self._last_live: MessageView | None = None
        self._activity: tuple[str, ...] = ()
        self._final: MessageView | None = None

    @property
    def append_only(self) -> bool:
        return self.native.enabled

    def posts_free(self) -> None:
        # slack-sdk waits out a 429 itself, and Slack's ~1 post/s keeps up with a burst.
        return None

    def measure(self, markdown: str) -> int:
        # Sent as is (a `markdown` block, a stream's `markdown_text`). Slack counts
        # characters, some of them as two; bytes are never fewer.
        return len(markdown.encode())

    # ---- answer messages -------------------------------------------------------------

    async def post(self, view: MessageView) -> str:
        self._remember(view)
        if self.native.enabled:
            await self._sync_control()
            # Started at once, even empty, so the thread keeps the order of the parts.
            ts = await self._start_stream(view)
            if ts is not None:
                return ts
        return await self._post_blocks(view)

    async def edit(self, message_id: str, view: MessageView) -> None:
        self._remember(view)
        if message_id in self._deleted:
            await self._sync_control()  # its tool activity still shows there
            return
        stream = self._streams.get(message_id)
        if stream is not None and not view.live and not view.shown_text.strip():
            # A part that ended with no text (a choice came first): nothing to keep.
            await self._stop_stream(message_id)
            await self.web.chat_delete(channel=self.channel, ts=message_id)
            self._deleted.add(message_id)
            await self._sync_control()
            return
        if stream is not None and await self._append(message_id, stream, view):
            await self._sync_control()
            return
        text, blocks = message_blocks(view)
        await self._update(message_id, text, blocks)
        if self._control_ts is not None:
            await self._sync_control()

    async def _update(self, ts: str, text: str, blocks: list[dict[str, Any]]) -> None:
        try:
            await self.web.chat_update(channel=self.channel, ts=ts, text=text, blocks=blocks)
        except SlackApiError as exc:
            if exc.response.get("error") in GONE:
                raise MessageGone(f"{ts}: {exc.response.get('error')}") from exc
            raise

    async def _post_blocks(self, view: MessageView) -> str:
        text, blocks = message_blocks(view)
        response = await self.web.chat_postMessage(
            channel=self.channel,
            thread_ts=self.thread_ts,
            text=text,
            blocks=blocks,
            unfurl_links=False,
            unfurl_media=False,
        )
        return str(response["ts"])

    # ---- native streams --------------------------------------------------------------

    async def _start_stream(self, view: MessageView) -> str | None:
        try:
            # slack-sdk leaves out the arguments that are None.
            response = await self.web.chat_startStream(
                channel=self.channel,
                thread_ts=self.thread_ts,
                markdown_text=view.text[:APPEND_LIMIT] or None,
                recipient_user_id=None if self.direct else self.user_id,
                recipient_team_id=None if self.direct else self.team_id,
            )
        except SlackApiError as exc:
            self.native.refused(str(exc.response.get("error", "")))
            log.info("chat.startStream failed (%s): posting instead", exc.response.get("error"))
            return None
        ts = str(response["ts"])
        self._streams[ts] = _Stream(view.text[:APPEND_LIMIT], self.clock())
        if len(view.text) > APPEND_LIMIT or not view.live:
            await self._append(ts, self._streams[ts], view)
        return ts

    async def _append(self, ts: str, stream: _Stream, view: MessageView) -> bool:
        """Bring a stream up to `view`; False when it had to stop (edit it instead)."""
        fresh = self.clock() - stream.started_at < STREAM_STALE_AFTER
        if not fresh or not view.text.startswith(stream.sent):
            await self._stop_stream(ts)
            return False
        added = view.text[len(stream.sent) :]
        try:
            for start in range(0, len(added), APPEND_LIMIT):
                piece = added[start : start + APPEND_LIMIT]
                await self.web.chat_appendStream(channel=self.channel, ts=ts, markdown_text=piece)
                stream.sent += piece
            if not view.live:
                # A finished stream takes blocks below its text: the link, if any.
                await self.web.chat_stopStream(
                    channel=self.channel, ts=ts, blocks=link_blocks(view) or None
                )
                del self._streams[ts]
        except SlackApiError as exc:
            log.info("streaming to %s failed (%s): editing instead", ts, exc.response.get("error"))
            await self._stop_stream(ts)
            return False
        return True

    async def _stop_stream(self, ts: str) -> None:
        self._streams.pop(ts, None)
        try:
            await self.web.chat_stopStream(channel=self.channel, ts=ts)
        except SlackApiError as exc:
            log.debug("chat.stopStream %s: %s", ts, exc.response.get("error"))

    # ---- the control message of a native turn ------------------------------------------

    def _remember(self, view: MessageView) -> None:
        # A sealed part still reports how its tools ended; the live one has the Stop state.
        if view.activity:
            self._activity = view.activity
        if view.live:
            self._last_live = view
        elif view.state in ("interrupted", "error"):
            self._final = view

    def _control(self) -> tuple[str, bool] | None:
        view = self._last_live
        if view is None:
            return None
        lines = [to_mrkdwn(line) for line in self._activity]
        if view.state == "queued":
            lines.append(status_line(view))
        text = "\n".join(lines) or ":hourglass_flowing_sand: working…"
        return text, view.stop or view.state == "running"

    async def _sync_control(self) -> None:
        wanted = self._control()
        if wanted is None or wanted == self._control_shown:
            return
        text, stop = wanted
        blocks = [context_block("lb_status", text)]
        if stop and self._last_live is not None:
            blocks.append(controls_block(self._last_live.loop_id))
        if self._control_ts is None:
            response = await self.web.chat_postMessage(
                channel=self.channel,
                thread_ts=self.thread_ts,
                text=text,
                blocks=blocks,
            )
            self._control_ts = str(response["ts"])
        elif self.clock() - self._control_at < self.edit_interval:
            return  # the next call, or the end of the turn, brings it up to date
        else:
            await self.web.chat_update(
                channel=self.channel, ts=self._control_ts, text=text, blocks=blocks
            )
        self._control_shown = wanted
        self._control_at = self.clock()

    async def close(self, state: TurnState) -> None:
        for ts in list(self._streams):
            await self._stop_stream(ts)
        if self._control_ts is None:
            return
        lines = [to_mrkdwn(line) for line in self._activity]
        if self._final is not None:
            lines.append(status_line(self._final))
        if not lines:
            await self.web.chat_delete(channel=self.channel, ts=self._control_ts)
            return
        text = "\n".join(lines)
        if self._control_shown == (text, False):
            return
        wait = self.edit_interval - (self.clock() - self._control_at)
        if wait > 0:
            await asyncio.sleep(wait)
        await self.web.chat_update(
            channel=self.channel,
            ts=self._control_ts,
            text=text,
            blocks=[context_block("lb_status", text)],
        )

    # ---- choices -----------------------------------------------------------------------

    async def post_choice(self, view: ChoiceView) -> str:
        text, blocks = choice_blocks(view)
        response = await self.web.chat_postMessage(
            channel=self.channel,
            thread_ts=self.thread_ts,
            text=text,
            blocks=blocks,
        )
        return str(response["ts"])

    async def edit_choice(self, message_id: str, view: ChoiceView) -> None:
        text, blocks = choice_blocks(view)
        await self._update(message_id, text, blocks)
