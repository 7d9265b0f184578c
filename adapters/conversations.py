"""The platform-neutral heart of an adapter: messages in, turns out, clicks decided.

A platform adapter turns its events into `IncomingMessage`s and clicks into
`Action`s, and gives a `Surface` to show a turn on. Everything else — who may
write, which loop a conversation is bound to, the Idempotency-Key, streaming
the turn into live messages, answering choices — happens here, through the
Loop API client only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Literal

import httpx

from adapters import metrics
from adapters.actions import Action
from adapters.attachments import FilesIn, SharedFiles, bring_in
from adapters.background import BackgroundTurns
from adapters.binding import STARTED_BY, Binding, ConversationKey, ThreadBindings
from adapters.chat_thread import ChatThread, IncomingFile, tell
from adapters.dedupe import RecentKeys
from adapters.policy import Actor, Policy
from adapters.render import RenderStats
from adapters.routing import Routes
from adapters.settings import view_links_wanted
from adapters.showing import TurnShows
from adapters.starting import Start, find_or_start, turn_mode
from adapters.surface import Surface
from adapters.views import TurnState
from bridge.client import LoopApiError, LoopClient
from bridge.contract.events import FileSharedFrame, LoopEvent
from bridge.contract.models import AUTHOR_LIMIT, Author, PermissionMode

log = logging.getLogger(__name__)

NOT_YOURS = "Only the person who started this thread or an admin can do that."
# How long the first answer to a message may take to be told apart from a refusal.
REFUSAL_WAIT = 0.5

SurfaceFactory = Callable[[Binding, "IncomingMessage"], Surface]
# Where the conversation shows turns that no message started.
BackgroundSurface = Callable[[Binding], Surface]
Answers = dict[str, str | list[str]]


@dataclass(frozen=True)
class IncomingMessage:
    """A person's message, as every platform describes it."""

    key: ConversationKey
    message_id: str
    author: Actor
    # What to send to the loop: the platform's mention of the bot is removed.
    text: str
    # The bot was mentioned: the message may start a loop.
    mentioned: bool = False
    # A direct message: every message is for the bot.
    direct: bool = False
    # Files attached to it, and its thread's extras (history, notes, files); see
    # chat_thread.py. Without `thread`, files, context and shared files are left out.
    files: tuple[IncomingFile, ...] = ()
    thread: ChatThread | None = None


# refused: a budget the message falls under is spent (`text` says which, and when it resets).
# no_loop: the message's options named what the server does not know (said in the thread).
Handled = Literal["turn", "duplicate", "ignored", "not_allowed", "empty", "refused", "no_loop"]


@dataclass
class TurnResult:
    handled: Handled
    binding: Binding | None = None
    created: bool = False
    state: TurnState | None = None
    text: str = ""
    stats: RenderStats | None = None


Decided = Literal["answered", "stopped", "not_allowed", "gone", "failed"]


@dataclass(frozen=True)
class Decision:
    outcome: Decided
    message: str = ""


class Conversations:
    """One per adapter process; `source` names the platform in `choice_resolved`."""

    def __init__(
        self,
        client: LoopClient,
        policy: Policy,
        *,
        platform: str,
        permission_mode: PermissionMode | None = None,
        view_links: bool | None = None,
        routes: Routes | None = None,
    ) -> None:
        self.client = client
        self.policy = policy
        self.platform = platform
        self.permission_mode = permission_mode
        # Per-channel defaults of new loops (repo, branch, …): see routing.py.
        self.routes = routes if routes is not None else Routes()
        # A loop's first reply links to its page (read-only, for everyone in the thread).
        self.view_links = view_links_wanted() if view_links is None else view_links
        self.bindings = ThreadBindings(client)
        self.recent = RecentKeys()
        self.shows = TurnShows(client, platform)
        self.background = BackgroundTurns(client, self.shows)

    async def close(self) -> None:
        await self.background.close()

    def source(self, actor: Actor) -> str:
        """How an answer given here is named in the loop's history: `slack:U123`."""
        return f"{self.platform}:{actor.user_id}"

    def author(self, actor: Actor) -> Author:
        """Who wrote a message, for the agent and the loop's history."""
        name = " ".join("".join(c for c in actor.name if c.isprintable()).split())
        name = name[:AUTHOR_LIMIT] or actor.user_id
        return Author(id=self.source(actor)[:AUTHOR_LIMIT], name=name)

    # ---- messages ---------------------------------------------------------------------

    async def handle(
        self,
        message: IncomingMessage,
        surface_for: SurfaceFactory,
        background: BackgroundSurface | None = None,
    ) -> TurnResult:
        """Send a person's message to its conversation's loop and show the turn; with
        `background`, show the loop's background turns there too (see background.py)."""
        if not self.recent.first_time(message.key.message_key(message.message_id)):
            return TurnResult("duplicate")
        if not message.text.strip() and not message.files:
            return TurnResult("empty")
        if not self.policy.may_send(message.author, message.key.channel):
            return TurnResult("not_allowed")
        result = await self._handle(message, surface_for, background)
        metrics.ADAPTER_MESSAGES.labels(self.platform, result.handled).inc()
        return result

    async def _handle(
        self,
        message: IncomingMessage,
        surface_for: SurfaceFactory,
        background: BackgroundSurface | None,
    ) -> TurnResult:
        order = _Turnstile(self.bindings.lock(message.key))
        await order.enter()
        try:
            start = await self._binding(message)
            binding, created = start.binding, start.created
            if start.refusal and message.thread is not None:
                await tell(message.thread, start.refusal)
                return TurnResult("no_loop", text=start.refusal)
            if binding is None:
                return TurnResult("ignored")
            files = await self._files_in(binding, message)
            if created and start.options.summary() and message.thread is not None:
                # The thread's first reply says what the loop works with.
                await tell(message.thread, start.options.summary())
            content = files.content(start.content)
            if not content.strip():  # only options (`@bot repo=app`): the loop waits
                return TurnResult("empty", binding, created)
            if background is not None:
                bound = binding
                self.background.follow(binding.loop_id, lambda: background(bound))
            events = self.client.send(
                binding.loop_id,
                content,
                permission_mode=turn_mode(binding, self.routes, self.permission_mode),
                idempotency_key=message.key.message_key(message.message_id),
                author=self.author(message.author),
                attachments=files.attachments,
            )
            shared = (
                SharedFiles(self.client, binding.loop_id, message.thread)
                if message.thread is not None
                else None
            )
            async with contextlib.aclosing(events):
                # A refusal (a spent budget) comes back at once, before any event: it is
                # told to the person instead of showing a turn. A first event slower than
                # that (an agent starting cold) does not hold up the turn's first message.
                first = asyncio.ensure_future(anext(events, None))
                try:
                    await asyncio.wait({first}, timeout=REFUSAL_WAIT)
                    refused = first.done() and _refusal(first.exception())
                    if refused:
                        return TurnResult("refused", binding, created, text=refused)
                    renderer = self.shows.renderer(
                        surface_for(binding, message),
                        binding.loop_id,
                        link=await self._view_link(binding.loop_id) if created else "",
                    )

                    async def turn() -> AsyncGenerator[LoopEvent, None]:
                        event = await first
                        # The lock keeps messages of one thread in order until the server
                        # has this one (its first event, `started` or `queued`).
                        order.leave()
                        if event is not None:
                            yield event
                        async for event in events:
                            if isinstance(event, FileSharedFrame) and shared is not None:
                                shared.shared(event.data)
                            yield event

                    async with contextlib.aclosing(turn()) as stream:
                        await self.shows.show(renderer, stream)
                    if shared is not None:
                        await shared.wait()
                finally:
                    if not first.done():  # cancelled while waiting: the stream can close
                        first.cancel()
                        await asyncio.wait({first})
            return TurnResult(
                "turn", binding, created, renderer.state, renderer.text, renderer.stats
            )
        finally:
            order.leave()

    async def _view_link(self, loop_id: str) -> str:
        """A read-only link to a new loop's page, or "" (none wanted, or none to be had:
        the answer matters more than its link)."""
        if not self.view_links:
            return ""
        try:
            return (await self.client.create_view_link(loop_id)).url
        except (LoopApiError, httpx.HTTPError) as exc:
            log.warning("no view link for loop %s: %s", loop_id, exc)
            return ""

    async def _binding(self, message: IncomingMessage) -> Start:
        if message.mentioned or message.direct:
            # A mention inside a thread brings the thread's earlier messages along.
            mid_thread = (
                message.mentioned
                and not message.direct
                and (message.key.thread != message.message_id)
            )
            return await find_or_start(
                self.bindings,
                self.routes,
                message.key,
                text=message.text,
                started_by=message.author.user_id,
                thread=message.thread,
                before=message.message_id if mid_thread else None,
            )
        return Start(await self.bindings.find(message.key), content=message.text)

    async def _files_in(self, binding: Binding, message: IncomingMessage) -> FilesIn:
        """The message's files, uploaded to the loop; what was not sent is said."""
        if not message.files or message.thread is None:
            return FilesIn()
        files = await bring_in(self.client, binding.loop_id, message.files, message.thread)
        for note in files.notes:
            await tell(message.thread, note)
        return files

    # ---- clicks -----------------------------------------------------------------------

    async def decide(
        self, actor: Actor, action: Action, answers: Answers | None = None
    ) -> Decision:
        """Carry out a click if `actor` may; the platform shows the outcome."""
        try:
            loop = await self.client.get_loop(action.loop_id)
        except LoopApiError as exc:
            return Decision("gone", f"that loop is not available ({exc.code})")
        started_by = loop.metadata.get(STARTED_BY)
        if not self.policy.may_decide(actor, str(started_by) if started_by else None):
            return Decision("not_allowed", NOT_YOURS)
        try:
            by = self.author(actor)
            if action.verb == "stop":
                await self.client.interrupt(action.loop_id, source=self.source(actor), by=by)
                return Decision("stopped")
            if action.verb in ("allow", "deny"):
                await self.client.answer_choice(
                    action.loop_id,
                    action.choice_id,
                    allow=action.verb == "allow",
                    source=self.source(actor),
                    by=by,
                )
            else:
                if not answers:
                    return Decision("failed", "Pick an answer first.")
                await self.client.answer_choice(
                    action.loop_id,
                    action.choice_id,
                    answers=answers,
                    source=self.source(actor),
                    by=by,
                )
        except LoopApiError as exc:
            if exc.code == "choice_not_found":
                return Decision("gone", "This was already answered, or the turn has ended.")
            log.warning("answering %s failed: %s", action, exc)
            return Decision("failed", f"That did not work: {exc.message}")
        return Decision("answered")


def _refusal(exc: BaseException | None) -> str:
    """The one-line message of a budget refusal, or ""."""
    if isinstance(exc, LoopApiError) and exc.code == "budget_exceeded":
        return exc.message
    return ""


class _Turnstile:
    """A conversation's lock, left once (by the first event or at the end)."""

    def __init__(self, lock: asyncio.Lock) -> None:
        self._lock = lock
        self._held = False

    async def enter(self) -> None:
        await self._lock.acquire()
        self._held = True

    def leave(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()
