"""A message that may start a loop: its options (routing), the thread's earlier messages
(context), the loop itself — or the reason no loop was made."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from adapters.binding import Binding, ConversationKey, ThreadBindings
from adapters.chat_thread import ChatThread
from adapters.context import thread_context
from adapters.routing import LoopOptions, OptionError, Routes, mode_of
from bridge.client import LoopApiError
from bridge.contract.models import PermissionMode

log = logging.getLogger(__name__)

# Refusals of `POST /loops` that a person can fix by choosing other names.
NAME_ERRORS = frozenset(
    {
        "unknown_repo",
        "unknown_profile",
        "unknown_vault",
        "invalid_branch",
        "repo_not_allowed",
        "profile_not_allowed",
        "vault_not_allowed",
    }
)


@dataclass(frozen=True)
class Start:
    binding: Binding | None
    created: bool = False
    # What to send to the loop (the context block first, options taken out).
    content: str = ""
    # Set when no loop was made for a reason the person should read.
    refusal: str = ""
    options: LoopOptions = field(default_factory=LoopOptions)


def places(key: ConversationKey) -> tuple[str, ...]:
    """Where routes are looked up for a conversation, most specific first: its channel,
    then its workspace (Slack team, Discord guild)."""
    return (key.channel, key.workspace)


async def find_or_start(
    bindings: ThreadBindings,
    routes: Routes,
    key: ConversationKey,
    *,
    text: str,
    started_by: str,
    thread: ChatThread | None,
    before: str | None,
) -> Start:
    """The conversation's loop, made now when it has none (call under its lock).

    `before` is the message's id when the earlier messages of its thread should come
    with it (a mention in a thread that already has messages)."""
    found = await bindings.find(key)
    if found is not None:
        return Start(found, content=text)
    try:
        options, rest = routes.choose(text, *places(key))
    except OptionError as exc:
        return Start(None, refusal=f"No loop was started: {exc}")
    context = ""
    if thread is not None and before is not None:
        try:
            context = thread_context(await thread.history(before))
        except Exception as exc:  # the loop is worth more than its context
            log.warning("could not read the thread before %s: %s", before, exc)
    try:
        binding, created = await bindings.find_or_create(
            key, first_text=rest, started_by=started_by, options=options
        )
    except LoopApiError as exc:
        if exc.code not in NAME_ERRORS:
            raise
        return Start(None, refusal=f"No loop was started: {exc.message}")
    return Start(binding, created, context + rest, options=as_made(binding, options))


def as_made(binding: Binding, asked: LoopOptions) -> LoopOptions:
    """What a new loop works with, as the server made it (a repo's configured branch)."""
    loop = binding.created
    if loop is None:
        return asked
    profiles = tuple(loop.profiles) or None
    vault = loop.vault if loop.vault != "default" else None
    return LoopOptions(loop.repo, loop.branch, profiles, vault, asked.permission_mode)


def turn_mode(
    binding: Binding, routes: Routes, fallback: PermissionMode | None
) -> PermissionMode | None:
    """A turn's permission mode: the loop's own (chosen when it started), the place's,
    else the adapter's."""
    return (
        mode_of(binding.metadata)
        or routes.defaults(*places(binding.key)).permission_mode
        or (fallback)
    )
