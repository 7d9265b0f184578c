"""What was said in a thread before the bot was mentioned, for a loop that starts there.

A platform reads the thread once (Slack: one `conversations.replies` call; Discord:
the channel's history) and gives its messages, root first; this module keeps the
root and the newest of the rest within the bounds and writes them as one attributed
block of text, saying what it left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MAX_MESSAGES = 50
MAX_CHARS = 20_000
# A single message longer than this is cut, so one paste cannot crowd out the rest.
MAX_MESSAGE_CHARS = 4_000


@dataclass(frozen=True)
class ThreadMessage:
    """One earlier message: who wrote it (platform id and name) and its text."""

    author_id: str
    author_name: str
    text: str
    bot: bool = False

    def line(self) -> str:
        who = f"{self.author_name} ({self.author_id}{', a bot' if self.bot else ''})"
        text = self.text.strip()
        if len(text) > MAX_MESSAGE_CHARS:
            text = text[: MAX_MESSAGE_CHARS - 1] + "…"
        return f"[{who}]: {text}"


def thread_context(
    messages: Sequence[ThreadMessage],
    *,
    max_messages: int = MAX_MESSAGES,
    max_chars: int = MAX_CHARS,
) -> str:
    """The block the loop's first message starts with ("" for no earlier messages).

    `messages` are the thread's earlier messages, oldest (the root) first. The root is
    always kept; then the newest others, as many as fit in both bounds.
    """
    said = [m for m in messages if m.text.strip()]
    if not said:
        return ""
    root, rest = said[0], said[1:]
    lines = [root.line()]
    budget = max_chars - len(lines[0])
    kept: list[str] = []
    for message in reversed(rest):
        line = message.line()
        if len(kept) + 1 >= max_messages or len(line) + 1 > budget:
            break
        kept.append(line)
        budget -= len(line) + 1
    kept.reverse()
    left_out = len(rest) - len(kept)
    header = f"Earlier in this thread ({1 + len(kept)} message{'s' if kept else ''}"
    if left_out:
        header += f"; {left_out} older message{'s' if left_out != 1 else ''} left out"
    header += "):"
    gap = [f"[… {left_out} message{'s' if left_out != 1 else ''} left out …]"] if left_out else []
    return "\n".join([header, lines[0], *gap, *kept]) + "\n\n"
