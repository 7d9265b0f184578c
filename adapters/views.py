"""What the adapters show, described without any platform's words.

A platform turns these into its own messages (Slack Block Kit, Discord content
and components). Text is Markdown, as the model wrote it; the platform converts
it if it must (Slack's mrkdwn).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

TurnState = Literal["queued", "running", "waiting", "done", "interrupted", "error"]
ChoiceKind = Literal["permission", "question"]
ChoiceState = Literal["pending", "resolved", "cancelled"]
# Tools whose summary is the path of the file they read or change.
FILE_TOOLS = frozenset({"Write", "Edit", "MultiEdit", "NotebookEdit", "Read"})
# How many recent tool lines a message keeps; older ones become "+N more".
ACTIVITY_LINES = 3


@dataclass(frozen=True)
class MessageView:
    """One message of a turn's answer.

    `text` is one part of the answer; `closing` closes a code block that is still
    open in the live message (a message shows `text + closing`, which has balanced
    fences; an append-only stream sends `text` alone). `activity` holds
    compact tool lines ("running `pytest -q`"). `state` is the turn's state when
    this message is its live one; a sealed part carries the state it ended in.
    `stop` asks for a Stop button; `note` is a short status line (queue position,
    error message). `attachment` is the rest of an answer too long to post as
    messages in good time, which the platform sends as a file with this message.
    `link` is the URL of the loop's page ("View loop"), on a loop's first reply.
    """

    loop_id: str
    text: str = ""
    closing: str = ""
    activity: tuple[str, ...] = ()
    hidden_activity: int = 0
    state: TurnState = "running"
    stop: bool = False
    note: str | None = None
    attachment: str = ""
    link: str = ""

    @property
    def shown_text(self) -> str:
        return self.text + self.closing

    @property
    def live(self) -> bool:
        return self.state in ("queued", "running", "waiting")


@dataclass(frozen=True)
class Option:
    label: str
    description: str = ""


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    header: str = ""
    options: tuple[Option, ...] = ()
    multi_select: bool = False


@dataclass(frozen=True)
class ChoiceView:
    """A point where the agent waits for a person: buttons, then who decided what."""

    loop_id: str
    choice_id: str
    kind: ChoiceKind
    title: str
    # For a permission: what the tool would do ("echo hi > f.txt").
    detail: str = ""
    tool: str = ""
    questions: tuple[Question, ...] = ()
    state: ChoiceState = "pending"
    # Markdown line shown once the choice is no longer pending ("Allowed by …").
    outcome: str = ""

    def finished(self, state: ChoiceState, outcome: str) -> ChoiceView:
        return ChoiceView(
            self.loop_id,
            self.choice_id,
            self.kind,
            self.title,
            self.detail,
            self.tool,
            self.questions,
            state,
            outcome,
        )


def choice_view(loop_id: str, data: dict[str, Any]) -> ChoiceView:
    """The view of a `requires_choice` event's data."""
    payload = data.get("payload") or {}
    kind: ChoiceKind = "question" if data.get("kind") == "question" else "permission"
    if kind == "permission":
        tool = str(payload.get("tool") or "tool")
        return ChoiceView(
            loop_id,
            data["choice_id"],
            kind,
            title=str(payload.get("title") or f"Allow {tool}?"),
            detail=str(payload.get("input_summary") or ""),
            tool=tool,
        )
    raw_questions = payload.get("questions", [])
    questions = tuple(_question(index, raw) for index, raw in enumerate(raw_questions))
    title = questions[0].text if len(questions) == 1 else "The agent has questions"
    return ChoiceView(loop_id, data["choice_id"], kind, title=title, questions=questions)


def _question(index: int, raw: dict[str, Any]) -> Question:
    options = tuple(
        Option(str(option.get("label", "")), str(option.get("description") or ""))
        for option in raw.get("options", [])
    )
    return Question(
        id=str(raw.get("id") or f"q{index + 1}"),
        text=str(raw.get("question") or ""),
        header=str(raw.get("header") or ""),
        options=options,
        multi_select=bool(raw.get("multi_select") or raw.get("multiSelect")),
    )


@dataclass
class Activity:
    """Tool lines of one message, newest last, at most ACTIVITY_LINES shown."""

    lines: list[str] = field(default_factory=list)
    _by_tool_use: dict[str, int] = field(default_factory=dict)

    def started(self, tool_use_id: str, tool: str, summary: str | None) -> None:
        self._by_tool_use[tool_use_id] = len(self.lines)
        self.lines.append(activity_line(tool, summary, None))

    def finished(self, tool_use_id: str, tool: str, summary: str | None, ok: bool) -> None:
        index = self._by_tool_use.get(tool_use_id)
        if index is not None:
            self.lines[index] = activity_line(tool, summary, ok)

    def shown(self) -> tuple[tuple[str, ...], int]:
        hidden = max(0, len(self.lines) - ACTIVITY_LINES)
        return tuple(self.lines[hidden:]), hidden


def activity_line(tool: str, summary: str | None, ok: bool | None) -> str:
    """ "running `pytest -q`", then "ran `pytest -q`" or "failed: `pytest -q`"."""
    # A file tool's line names the file it touched: a long path keeps its end.
    what = f"`{_one_line(summary, keep_end=tool in FILE_TOOLS)}`" if summary else f"*{tool}*"
    if tool not in ("Bash", "BashOutput") and summary:
        what = f"*{tool}* {what}"
    if ok is None:
        return f"running {what}"
    return f"ran {what}" if ok else f"failed: {what}"


def _one_line(text: str, limit: int = 80, keep_end: bool = False) -> str:
    line = " ".join(text.split()).replace("`", "'")
    if len(line) <= limit:
        return line
    return "…" + line[-(limit - 1) :] if keep_end else line[: limit - 1] + "…"


@dataclass(frozen=True)
class Outcome:
    """How a choice was decided, for the platform to show beside the choice."""

    verb: Literal["allowed", "denied", "chose"]
    user_id: str
    picked: list[str] = field(default_factory=list)


def outcome_of(user_id: str, verb: str, answers: dict[str, str | list[str]] | None) -> Outcome:
    """A click's verb (`allow`, `deny`, or an answer) and answers, as an outcome."""
    if verb == "allow":
        return Outcome("allowed", user_id)
    if verb == "deny":
        return Outcome("denied", user_id)
    picked = [
        ", ".join(value) if isinstance(value, list) else value for value in (answers or {}).values()
    ]
    return Outcome("chose", user_id, picked)


@dataclass(frozen=True)
class OutcomeMarks:
    """How a platform writes an outcome line: a mark per verb, and bold picked answers
    (escaped for its markup)."""

    allowed: str
    denied: str
    chose: str
    bold: Callable[[str], str]


def outcome_line(
    user_id: str, verb: str, answers: dict[str, str | list[str]] | None, marks: OutcomeMarks
) -> str:
    """The line shown under a decided choice; both platforms mention a user as <@id>."""
    decided = outcome_of(user_id, verb, answers)
    who = f"<@{decided.user_id}>"
    if decided.verb == "allowed":
        return f"{marks.allowed} Allowed by {who}"
    if decided.verb == "denied":
        return f"{marks.denied} Denied by {who}"
    return f"{marks.chose} {who} chose {marks.bold(', '.join(decided.picked))}"
