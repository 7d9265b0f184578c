"""Thread binding: a platform conversation ↔ a loop, kept in the loop's metadata.

The adapter holds no table of its own: the key of a conversation is written into
the metadata of the loop it started, and found again with the API's metadata
filter. A restarted adapter (or a second one) therefore finds the same loop.
"""

from __future__ import annotations

import asyncio
import re
import weakref
from dataclasses import dataclass, field
from typing import Any

from adapters.routing import PERMISSION_MODE, LoopOptions
from bridge.client import LoopClient
from bridge.contract.models import LoopOut

# Metadata keys; the engine never reads them, only the API's filter does.
BINDING = "binding"
PLATFORM = "platform"
STARTED_BY = "started_by"
TITLE_WORDS = 8
TITLE_CHARS = 80


@dataclass(frozen=True)
class ConversationKey:
    """Where a conversation lives: (platform, workspace, channel, thread).

    `thread` is the platform's id of the conversation's root (a Slack thread's
    `thread_ts`, a Discord thread's channel id); a platform whose channel is the
    whole conversation repeats the channel id there.
    """

    platform: str
    workspace: str
    channel: str
    thread: str

    def __str__(self) -> str:
        return f"{self.platform}:{self.workspace}:{self.channel}:{self.thread}"

    def message_key(self, message_id: str) -> str:
        """The Idempotency-Key of one platform message sent to the loop."""
        return f"{self}:{message_id}"


@dataclass(frozen=True)
class Binding:
    key: ConversationKey
    loop_id: str
    # The platform user who started the conversation (default approver).
    started_by: str | None
    # The loop's metadata (routing keeps the loop's permission mode there).
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)
    # The loop as the server made it, when it was made just now (what it works with).
    created: LoopOut | None = field(default=None, compare=False)


def title_from(text: str) -> str:
    """A loop title from the first words of the message that started it."""
    words = re.sub(r"\s+", " ", text).strip().split(" ")
    title = " ".join(words[:TITLE_WORDS])
    if len(title) > TITLE_CHARS:
        title = title[: TITLE_CHARS - 1].rstrip() + "…"
    return title or "untitled"


class ThreadBindings:
    """Finds or creates the loop of a conversation, through the Loop API only."""

    def __init__(self, client: LoopClient) -> None:
        self.client = client
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def lock(self, key: ConversationKey) -> asyncio.Lock:
        """Held while a message of this conversation is handed to its loop, to keep order."""
        name = str(key)
        lock = self._locks.get(name)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[name] = lock
        return lock

    async def find(self, key: ConversationKey) -> Binding | None:
        loop = await self.client.find_loop({BINDING: str(key)})
        if loop is None:
            return None
        started_by = loop.metadata.get(STARTED_BY)
        return Binding(
            key, loop.id, str(started_by) if started_by is not None else None, loop.metadata
        )

    async def find_or_create(
        self,
        key: ConversationKey,
        *,
        first_text: str,
        started_by: str,
        options: LoopOptions | None = None,
    ) -> tuple[Binding, bool]:
        """The conversation's loop, and whether it was created now (call under `lock`);
        a new loop gets `options` (routing: repo, branch, profiles, vault, mode)."""
        found = await self.find(key)
        if found is not None:
            return found, False
        options = options or LoopOptions()
        metadata = {BINDING: str(key), PLATFORM: key.platform, STARTED_BY: started_by}
        if options.permission_mode:
            metadata[PERMISSION_MODE] = options.permission_mode
        loop = await self.client.create_loop(
            title=title_from(first_text), metadata=metadata, **options.create_args()
        )
        return Binding(key, loop.id, started_by, loop.metadata, loop), True
