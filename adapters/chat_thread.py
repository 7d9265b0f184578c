"""What the shared part asks of a platform's thread beyond showing a turn (`Surface`):
its earlier messages, the files people attach, a plain note, and posting a file."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from adapters.context import ThreadMessage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IncomingFile:
    """A file attached to a person's message, as the platform describes it."""

    name: str
    # Where to download it; None when the platform gives no way (an external file,
    # one hidden by a plan's limits): it is then named as not sent.
    url: str | None
    size: int | None
    media_type: str = ""


class ChatThread(Protocol):
    # The largest file the platform takes in one post here, in bytes.
    file_limit: int

    async def history(self, before: str) -> list[ThreadMessage]:
        """The thread's messages before message `before`, root first (one read)."""
        ...

    def download(self, file: IncomingFile) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """The file's bytes as they arrive; raises `DownloadFailed` when it cannot."""
        ...

    async def say(self, text: str) -> None:
        """A short note in the thread, for everyone in it (Markdown)."""
        ...

    async def post_file(self, name: str, data: bytes, caption: str) -> None:
        """A file in the thread, with its caption."""
        ...


class DownloadFailed(Exception):
    """A file could not be fetched from the platform; the message says why."""


async def tell(thread: ChatThread, text: str) -> None:
    """A note in the thread, best effort: a note that cannot be posted is logged, and
    never stops the turn it is about."""
    try:
        await thread.say(text)
    except Exception as exc:
        log.warning("a note to the thread failed: %s", exc)
