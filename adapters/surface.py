"""The few calls an adapter makes on its platform to show one turn.

A platform implements `Surface` for one conversation (a Slack thread, a
Discord thread); the turn renderer decides what to show and when, and calls it.
Every call may raise: the renderer retries with backoff, so a platform raises
what its client raises and needs no retry logic of its own beyond honouring
`Retry-After` (which both slack-sdk and discord.py do).
"""

from __future__ import annotations

from typing import Protocol

from adapters.views import ChoiceView, MessageView, TurnState


class MessageGone(Exception):
    """The message is no more (deleted by someone): retrying cannot help."""


class Surface(Protocol):
    # The most a part of the answer may measure, as `measure` counts.
    part_limit: int
    # Seconds between two edits of one message (from the end of the first).
    edit_interval: float

    @property
    def append_only(self) -> bool:
        """Text once shown can only be added to (a native stream): parts are then cut
        after what was shown, never before it."""
        ...

    def measure(self, markdown: str) -> int:
        """The size of a part of Markdown as the platform limits it."""
        ...

    def posts_free(self) -> int | None:
        """How many messages may be posted now without waiting on the platform's budget,
        keeping what it holds back for the end of a turn; None: no such budget (the
        renderer then never holds a part back, nor sends the rest as a file)."""
        ...

    async def post(self, view: MessageView) -> str:
        """Post a message of the answer (with `view.attachment` as a file); returns its id."""
        ...

    async def edit(self, message_id: str, view: MessageView) -> None: ...

    async def post_choice(self, view: ChoiceView) -> str: ...

    async def edit_choice(self, message_id: str, view: ChoiceView) -> None: ...

    async def close(self, state: TurnState) -> None:
        """The turn has ended and its last message is final."""
        ...
