"""The wire models of Loop API v1, shared by the server and the client."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, field_validator

from core.ids import rfc3339

Timestamp = Annotated[datetime, PlainSerializer(rfc3339, return_type=str)]
PermissionMode = Literal["default", "acceptEdits", "bypassPermissions", "plan", "dontAsk", "auto"]

TITLE_LIMIT = 200
AUTHOR_LIMIT = 200
METADATA_LIMIT = 16 * 1024
CONTENT_LIMIT = 1024 * 1024
IDEMPOTENCY_KEY_LIMIT = 256


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- requests ------------------------------------------------------------------------


class CreateLoop(Strict):
    title: str = "untitled"
    metadata: dict[str, Any] = Field(default_factory=dict)
    profiles: list[str] = Field(default_factory=list)
    vault: str = "default"
    repo: str | None = None


class Person(Strict):
    """[ext] A person a bot speaks for (`author` of a message, `by` of an answer)."""

    id: str = Field(min_length=1, max_length=AUTHOR_LIMIT)
    name: str | None = Field(None, max_length=AUTHOR_LIMIT)


class SendMessage(Strict):
    content: str
    permission_mode: PermissionMode | None = None
    author: Person | None = None


class Login(Strict):
    username: str
    password: str


class CreateToken(Strict):
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


class UsageTotals(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    cost_usd: float


class TurnUsage(UsageTotals):
    duration_ms: int


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


class PersonOut(BaseModel):
    id: str
    name: str | None = None


class ChoiceRecord(BaseModel):
    choice_id: str
    kind: Literal["permission", "question"]
    answer: dict[str, Any]
    source: str
    # [ext] Shown only when the answer named its person.
    by: PersonOut | None = Field(None, exclude_if=lambda value: value is None)


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
    ended: Literal["queued", "running", "done", "interrupted", "error"]
    error: ErrorInfo | None
    started_at: Timestamp | None
    ended_at: Timestamp | None
    author: PersonOut | None = None
    usage: TurnUsage | None = None


class HistoryPage(BaseModel):
    data: list[HistoryItem]
    first_id: str | None
    last_id: str | None
    has_more: bool


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


class ChoiceAnswer(BaseModel):
    """`{"allow": bool}` for a permission, `{"answers": {question_id: label}}` for a question.

    `source` [ext] names the surface that answered (`api` when absent), shown in
    `choice_resolved` and in history; `by` [ext] the person who answered (history, audit).
    """

    model_config = ConfigDict(extra="allow")
    allow: bool | None = None
    answers: dict[str, str | list[str]] | None = None
    source: str | None = Field(None, max_length=64)
    by: Person | None = None


class InterruptBody(Strict):
    """[ext] Optional: who interrupted, for the audit trail."""

    source: str | None = Field(None, min_length=1, max_length=64)
    by: Person | None = None


def metadata_size(metadata: dict[str, Any]) -> int:
    return len(json.dumps(metadata, separators=(",", ":")).encode())


class StreamEventModel(BaseModel):
    """One SSE event, as a client reads it: `id`, `event` name and the JSON `data`."""

    id: int | None = None
    event: str
    data: dict[str, Any]

    @field_validator("data", mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value
