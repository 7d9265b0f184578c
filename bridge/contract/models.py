"""The wire models of Loop API v1, shared by the server and the client."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, TypeAdapter, field_validator

from bridge.contract.events import TurnUsage
from bridge.contract.times import rfc3339

Timestamp = Annotated[datetime, PlainSerializer(rfc3339, return_type=str)]
PermissionMode = Literal["default", "acceptEdits", "bypassPermissions", "plan", "dontAsk", "auto"]

TITLE_LIMIT = 200
AUTHOR_LIMIT = 200
METADATA_LIMIT = 16 * 1024
CONTENT_LIMIT = 1024 * 1024
IDEMPOTENCY_KEY_LIMIT = 256
AUTHOR_LIMIT = 200
ATTACHMENTS_LIMIT = 20


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- requests ------------------------------------------------------------------------


class CreateLoop(Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"title": "kanban refactor", "metadata": {"slack_thread": "C123:1716.42"}}]
        },
    )
    title: str = Field("untitled", max_length=TITLE_LIMIT)
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="the caller's own key/values, at most 16 KB as JSON; never shown to the agent",
    )
    profiles: list[str] = Field(default_factory=list)
    vault: str = "default"
    repo: str | None = None
    branch: str | None = Field(
        None, description="[ext] the loop's own branch of its repo, made when missing"
    )


class Attachment(Strict):
    path: str = Field(description="a file of the loop's working directory")


ONE_LINE = "^[^\\x00-\\x1f\\x7f-\\x9f]*$"


class Author(Strict):
    """[ext] The person a relaying caller (a chat adapter) speaks for: `slack:U123`, "Alice"."""

    # The pattern documents what `_one_line` checks (schemas cannot run the check).
    id: str = Field(min_length=1, max_length=AUTHOR_LIMIT, pattern=ONE_LINE)
    name: str = Field(min_length=1, max_length=AUTHOR_LIMIT, pattern=ONE_LINE)

    @field_validator("id", "name")
    @classmethod
    def _one_line(cls, value: str) -> str:
        # The agent is told "[from NAME (ID)]" on a line of its own: a control character
        # (a line break, say) could make the line say something else.
        if any(ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0 for char in value):
            raise ValueError("must not hold control characters")
        return value


class SendMessage(Strict):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"content": "hello"}]}
    )
    content: str = Field(
        min_length=1, max_length=CONTENT_LIMIT, description="the message: at most 1 MB as UTF-8"
    )
    permission_mode: PermissionMode | None = None
    author: Author | None = None
    # Counted by the handler (too_many_attachments), not by validation.
    attachments: list[Attachment] | None = Field(
        None,
        description="[ext] files of the working directory; images reach the model as images",
        json_schema_extra={"maxItems": ATTACHMENTS_LIMIT},
    )


class Login(Strict):
    username: str
    password: str


class CreateToken(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"label": "ci"}]})
    label: str = Field("", max_length=200)


# ---- responses -----------------------------------------------------------------------


class CurrentTurn(BaseModel):
    turn_id: str
    started_at: Timestamp | None
    pending_choice_id: str | None


class LoopOut(BaseModel):
    id: str
    title: str
    created_at: Timestamp
    created_by: str
    archived: bool
    archived_at: Timestamp | None
    metadata: dict[str, Any]
    profiles: list[str]
    vault: str
    repo: str | None
    branch: str | None = None
    active_at: Timestamp | None = Field(
        None, description="[ext] when the loop last started a turn (or was created)"
    )


class UsageTotals(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    cost_usd: float


class LoopDetail(LoopOut):
    busy: bool
    queue_depth: int
    turn_count: int
    current_turn: CurrentTurn | None
    usage: UsageTotals | None = None


class UsageGroup(UsageTotals):
    key: str
    turns: int


class UsageReport(BaseModel):
    data: list[UsageGroup]
    total: UsageGroup


class LoopPage(BaseModel):
    data: list[LoopOut]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ToolCall(BaseModel):
    tool_use_id: str
    tool: str
    input_summary: str | None = None
    ok: bool | None = None
    # [ext] for people to read; long strings are cut.
    input: dict[str, Any] | None = Field(None, description="[ext] the tool's input, cut")
    output: str | None = Field(None, description="[ext] the tool's result as text, cut")
    diff: str | None = Field(None, description="[ext] a unified diff, for Write and Edit")
    event_id: int | None = Field(None, description="[ext] the id of its `tool_call` event")
    text_offset: int | None = Field(
        None, description="[ext] how much of `assistant_text` came before the call"
    )


class ChoiceRecord(BaseModel):
    choice_id: str
    kind: Literal["permission", "question"]
    answer: dict[str, Any]
    source: str
    # [ext] Shown only when the answer named its person.
    by: Author | None = Field(None, exclude_if=lambda value: value is None)
    payload: dict[str, Any] | None = Field(
        None, description="[ext] what was asked (the requires_choice payload), cut"
    )
    event_id: int | None = Field(None, description="[ext] the id of its `requires_choice` event")
    text_offset: int | None = Field(
        None, description="[ext] how much of `assistant_text` came before it was asked"
    )


class PendingChoice(BaseModel):
    """[ext] The choice a running turn waits on, as `requires_choice` gave it."""

    choice_id: str
    kind: Literal["permission", "question"]
    payload: dict[str, Any]


class AttachmentOut(BaseModel):
    path: str


class FileShared(BaseModel):
    path: str
    size: int
    media_type: str
    caption: str | None


class ErrorInfo(BaseModel):
    code: str
    message: str


class HistoryItem(BaseModel):
    turn_id: str
    trigger: Literal["message", "background"]
    user_text: str
    assistant_text: str
    tool_calls: list[ToolCall]
    choices: list[ChoiceRecord]
    author: Author | None = None
    ended: Literal["queued", "running", "done", "interrupted", "error"]
    error: ErrorInfo | None
    started_at: Timestamp | None
    ended_at: Timestamp | None
    attachments: list[AttachmentOut] = Field(default_factory=list)
    files_shared: list[FileShared] = Field(default_factory=list)
    pending_choice: PendingChoice | None = None
    usage: TurnUsage | None = None


class HistoryPage(BaseModel):
    data: list[HistoryItem]
    first_id: str | None
    last_id: str | None
    has_more: bool
    last_event_id: int = Field(
        0,
        description="[ext] the newest event this page reflects: `GET /events` with "
        "`last_event_id` (or `Last-Event-ID`) set to it continues the page exactly",
    )


class ViewLink(BaseModel):
    """[ext] A read-only link to one loop's page, for people who are not users."""

    url: str
    expires_at: Timestamp


class CreateViewLink(Strict):
    days: float | None = Field(None, gt=0, le=365, description="default LOOPBRIDGE_VIEW_LINK_DAYS")


class FileEntry(BaseModel):
    path: str = Field(description="relative to the working directory")
    type: Literal["file", "dir"]
    size: int | None = Field(description="bytes; null for a directory")
    modified_at: Timestamp


class FileList(BaseModel):
    data: list[FileEntry]


class FileWritten(BaseModel):
    path: str
    size: int


# The token endpoints keep the camelCase names of the contract.
class TokenCreated(BaseModel):
    tokenId: str
    token: str
    label: str
    createdAt: Timestamp


class TokenOut(BaseModel):
    tokenId: str
    label: str
    createdAt: Timestamp
    lastUsedAt: Timestamp | None = None


class TokenList(BaseModel):
    tokens: list[TokenOut]


class ErrorBody(BaseModel):
    type: str
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


AnswerSource = Annotated[
    str,
    Field(
        min_length=1,
        max_length=64,
        description="[ext] the surface that answered (`api` when absent), "
        "shown in `choice_resolved` and in history",
    ),
]
OptionLabel = Annotated[str, Field(min_length=1)]


class PermissionAnswer(Strict):
    """The answer to a permission: allow the tool call or not."""

    model_config = ConfigDict(extra="forbid", strict=True)
    allow: bool
    source: AnswerSource = "api"
    by: Author | None = Field(None, description="[ext] the person who answered (history, audit)")


class QuestionAnswer(Strict):
    """The answer to a question: an option label per question id (a list for multi_select)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    answers: dict[str, OptionLabel | Annotated[list[OptionLabel], Field(min_length=1)]] = Field(
        min_length=1
    )
    source: AnswerSource = "api"
    by: Author | None = Field(None, description="[ext] the person who answered (history, audit)")


# The body of `POST /loops/{id}/choices/{choice_id}`: either kind, nothing else.
ChoiceAnswer = PermissionAnswer | QuestionAnswer
CHOICE_ANSWER: TypeAdapter[ChoiceAnswer] = TypeAdapter(ChoiceAnswer)


class Accepted(BaseModel):
    """The request was taken; what it starts shows on the loop's event streams."""

    status: Literal["accepted"] = "accepted"


class InterruptBody(Strict):
    """[ext] Optional: who interrupted, for the audit trail."""

    source: str | None = Field(None, min_length=1, max_length=64)
    by: Author | None = None


def metadata_size(metadata: dict[str, Any]) -> int:
    return len(json.dumps(metadata, separators=(",", ":")).encode())
