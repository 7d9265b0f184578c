"""Splitting a growing Markdown answer into message-sized parts, fence-aware.

A platform message holds a bounded amount of text, so a long answer becomes
several messages ("parts"). A part ends on the best boundary that fits: a blank
line, else a line end, else a space, else anywhere. A code block that a cut goes
through is closed at the end of its part and reopened (with its language) at the
start of the next one, so every part has balanced fences.

Parts are sealed in order and never change afterwards: only the last part (the
tail) grows. That is what lets a renderer edit one live message and leave the
earlier ones alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

Measure = Callable[[str], int]

# A fence line opens or closes a code block: three or more backticks or tildes.
FENCE_LINE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
# Parts shorter than this share of the limit are avoided when a better cut exists.
MIN_SHARE = 0.5


@dataclass(frozen=True)
class Fence:
    """An open code block: its marker (```) and its whole opening line (```python)."""

    marker: str
    opening: str

    def closes(self, line: str) -> bool:
        match = FENCE_LINE.match(line)
        if match is None or match.group(2).strip():
            return False
        marker = match.group(1)
        return marker[0] == self.marker[0] and len(marker) >= len(self.marker)


def open_fence(text: str, start: Fence | None = None) -> Fence | None:
    """The code block still open at the end of `text` (which began inside `start`)."""
    fence = start
    for line in text.split("\n"):
        if fence is not None:
            if fence.closes(line):
                fence = None
            continue
        match = FENCE_LINE.match(line)
        if match is not None and "`" not in match.group(2):
            fence = Fence(match.group(1), line.strip())
    return fence


def closed(text: str, fence: Fence | None) -> str:
    """`text` with the open code block closed, as a part must show it."""
    if fence is None:
        return text
    return text + ("" if text.endswith("\n") else "\n") + fence.marker


def reopened(text: str, fence: Fence | None) -> str:
    return text if fence is None else f"{fence.opening}\n{text}"


@dataclass
class PartSplitter:
    """Feeds text in; seals parts of at most `limit` (by `measure`) as the text grows.

    `measure` gives the size of a part as the platform counts it, after any
    conversion (Slack measures the mrkdwn it will send), so no part is ever
    refused for its length.
    """

    limit: int
    measure: Measure = len
    parts: list[str] = field(default_factory=list)
    tail: str = ""
    # The code block open at the start of the tail (reopened there).
    _tail_fence: Fence | None = None

    def feed(self, text: str, keep: int = 0) -> list[str]:
        """Add text; returns the parts this sealed (possibly none).

        `keep` is how much of the tail is already shown where text can only be
        appended (a native stream): a cut then falls at or after it.
        """
        self.tail += text
        sealed: list[str] = []
        while self.measure(self.show_tail()) > self.limit:
            sealed.append(self._cut(keep))
            keep = 0
        return sealed

    def seal(self) -> str | None:
        """End the tail here (before a choice, say); None when it holds no text."""
        if not self.tail.strip() or self.tail.strip() == reopened("", self._tail_fence).strip():
            return None
        fence = open_fence(self.tail, self._tail_fence)
        part = closed(self.tail, fence)
        self.parts.append(part)
        self.tail = reopened("", fence)
        self._tail_fence = fence
        return part

    def show_tail(self) -> str:
        """The tail as a message shows it now: an open code block is closed."""
        return self.tail + self.tail_closing()

    def tail_closing(self) -> str:
        """What closes the tail's open code block for now ("" when none is open)."""
        return closed(self.tail, open_fence(self.tail, self._tail_fence))[len(self.tail) :]

    @property
    def text(self) -> str:
        """Every part and the tail, as shown."""
        return "".join(self.parts) + self.show_tail()

    def _cut(self, keep: int = 0) -> str:
        head, rest = self._best_cut(self.tail, keep)
        fence = open_fence(head, self._tail_fence)
        part = closed(head, fence)
        if fence is None:
            rest = rest.lstrip("\n")
        self.parts.append(part)
        self.tail = reopened(rest, fence)
        self._tail_fence = fence
        return part

    def _fits(self, head: str) -> bool:
        return self.measure(closed(head, open_fence(head, self._tail_fence))) <= self.limit

    def _best_cut(self, text: str, keep: int = 0) -> tuple[str, str]:
        # The longest prefix that fits (sizes grow with the prefix, near enough).
        low, high = 1, len(text)
        while low < high:
            middle = (low + high + 1) // 2
            if self._fits(text[:middle]):
                low = middle
            else:
                high = middle - 1
        longest = max(low, keep)
        floor = max(int(longest * MIN_SHARE), keep)
        window = text[:longest]
        for boundary in ("\n\n", "\n", " "):
            at = window.rfind(boundary)
            end = at + len(boundary)
            if at > 0 and end >= floor and self._fits(text[:end]):
                return text[:end], text[end:]
        return text[:longest], text[longest:]


def stream_safe(text: str) -> str:
    """The longest prefix of growing text that is safe to append to a stream now.

    Text appended to a stream cannot be taken back, and a later cut may fall right
    after it: so it ends after a whole line, or after a word of a line that cannot
    become a code fence. A half-written fence (`` `` ``) is never sent.
    """
    line_start = text.rfind("\n") + 1
    last_line = text[line_start:]
    if last_line.lstrip()[:1] in ("", "`", "~"):
        return text[:line_start]
    space = last_line.rfind(" ")
    return text[: line_start + space + 1] if space > 0 else text[:line_start]


def split_markdown(text: str, limit: int, measure: Measure = len) -> list[str]:
    """The whole of `text` as parts of at most `limit`, each with balanced fences."""
    splitter = PartSplitter(limit, measure)
    splitter.feed(text)
    splitter.seal()
    return splitter.parts
