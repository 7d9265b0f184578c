"""A turn as the runtime holds it, and the stored facts of a loop that its runtime needs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bridge.contract.events import Trigger
from bridge.contract.models import PermissionMode
from core.choices import Choice
from core.usage import Usage


@dataclass
class Turn:
    id: str
    number: int
    trigger: Trigger
    user_text: str
    permission_mode: PermissionMode
    # The person the caller speaks for ({"id", "name"}), told to the agent; None: the caller.
    author: dict[str, str] | None = None
    size: int = 0  # bytes of user_text, for the caps on queued messages
    text: list[str] = field(default_factory=list)
    tool_calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The full input of tool calls still running, for the diff of an edit.
    tool_inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    text_length: int = 0
    # Where each choice was asked: its event's id and how much text came before it.
    choice_marks: dict[str, dict[str, int]] = field(default_factory=dict)
    choices: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[dict[str, str]] = field(default_factory=list)
    files_shared: list[dict[str, Any]] = field(default_factory=list)
    pending: dict[str, Choice] = field(default_factory=dict)
    started_at: datetime | None = None
    ended: str | None = None
    error: dict[str, str] | None = None
    ended_at: datetime | None = None
    usage: Usage | None = None
    span: Any = None  # the turn's trace span, when tracing is on (core/tracing.py)
    # It waited behind another turn: its budgets are checked again before it starts.
    waited: bool = False
    interrupt_requested: bool = False
    # Set when the engine, not the agent, ends the turn: the agent's last words are ignored.
    ending: bool = False
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    start_saved: asyncio.Task[None] | None = None
    end_saved: asyncio.Task[None] | None = None

    @property
    def pending_choice_id(self) -> str | None:
        return next(iter(self.pending), None)

    @property
    def prompt(self) -> str:
        """What the agent reads: who wrote the message, when the caller said, then the text."""
        if self.author is None:
            return self.user_text
        return f"{attribution(self.author)}\n{self.user_text}"

    @property
    def pending_choice(self) -> dict[str, Any] | None:
        """The choice the turn waits on, as its `requires_choice` event told it."""
        choice = next((c for c in self.pending.values() if c.pending), None)
        if choice is None:
            return None
        return {"choice_id": choice.id, "kind": choice.kind, "payload": choice.payload}

    def new_row(self, loop_id: str, ended: str) -> dict[str, Any]:
        """The turns-table row of a turn that has just begun or been queued."""
        return {
            "id": self.id,
            "loop_id": loop_id,
            "number": self.number,
            "trigger": self.trigger,
            "user_text": self.user_text,
            "permission_mode": self.permission_mode,
            "author_id": self.author["id"] if self.author else None,
            "author_name": self.author["name"] if self.author else None,
            "ended": ended,
            "started_at": self.started_at,
            "attachments": self.attachments,
            **self.history_fields(),
        }

    def history_fields(self) -> dict[str, Any]:
        return {
            "assistant_text": "".join(self.text),
            "tool_calls": list(self.tool_calls.values()),
            "choices": self.choices,
            "files_shared": self.files_shared,
        }


@dataclass
class LoopSpec:
    """The stored facts of a loop that its runtime needs."""

    id: str
    owner: str
    archived: bool
    session_id: str | None
    turn_count: int
    profiles: list[str]
    vault: str
    repo: str | None
    branch: str | None = None
    # The agent CLI's running cost total of the session, as last reported.
    session_cost: float | None = None

    @classmethod
    def from_row(cls, row: Any) -> LoopSpec:
        return cls(
            row.id,
            row.created_by,
            row.archived,
            row.session_id,
            row.turn_count,
            list(row.profiles),
            row.vault,
            row.repo,
            row.branch,
            row.session_cost_usd,
        )


def attribution(author: dict[str, str]) -> str:
    """`[from Alice Smith (slack:U123)]`: one line, and no bracket that could close it early."""
    plain = str.maketrans("[]", "()")
    return f"[from {author['name'].translate(plain)} ({author['id'].translate(plain)})]"
