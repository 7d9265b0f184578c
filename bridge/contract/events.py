"""The typed payloads of the Loop API's stream events, one model per event name.

On the wire each event is an SSE frame, `event: <name>`, `data: <one JSON object>` and,
for every event but `ping`, an `id:`. `EVENT_DATA` maps each name to the model of its
data; `parse_event` reads one frame into a `LoopEvent`, a union discriminated on the
event name. Clients import these; the server publishes them in its OpenAPI document.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model

Trigger = Literal["message", "background"]


class EventData(BaseModel):
    # Fields may be added to an event later; a client that reads an older model keeps working.
    model_config = ConfigDict(extra="allow")


class QueuedEvent(EventData):
    """The loop was busy: this message waits; the stream's first event."""

    position: int = Field(ge=1)


class StartedEvent(EventData):
    """The turn begins, before any delta."""

    turn_id: str
    cold_start: bool = Field(description="the agent or its sandbox had to be started")
    trigger: Trigger


class SnapshotEvent(EventData):
    """`GET /events` attached mid-turn: the turn so far; the stream's first event."""

    turn_id: str
    assistant_text_so_far: str
    pending_choice_id: str | None


class AssistantDeltaEvent(EventData):
    """Visible text grows: clients add up the deltas of a turn."""

    text: str


class ThinkingDeltaEvent(EventData):
    """Extended thinking grows."""

    text: str


class ToolCallEvent(EventData):
    """The agent calls a tool (observe only: tools run inside the loop)."""

    tool_use_id: str
    tool: str
    input_summary: str | None = None


class ToolResultEvent(EventData):
    """The tool finished."""

    tool_use_id: str
    ok: bool


class ChoiceOption(BaseModel):
    label: str
    description: str


class Question(BaseModel):
    id: str = Field(description="the key of this question in an answer's `answers`")
    question: str
    header: str
    options: list[ChoiceOption]
    multi_select: bool


class PermissionPayload(BaseModel):
    tool: str
    input_summary: str | None
    title: str
    input: dict[str, Any]


class QuestionPayload(BaseModel):
    questions: list[Question]


class RequiresChoiceEvent(EventData):
    """The agent waits for a person: answer with `POST /loops/{id}/choices/{choice_id}`."""

    choice_id: str
    kind: Literal["permission", "question"]
    payload: PermissionPayload | QuestionPayload


class ChoiceResolvedEvent(EventData):
    """The choice was answered, by anyone, on any surface."""

    choice_id: str
    source: str


class FileSharedEvent(EventData):
    """The agent shared a file of its working directory (its `share_file` tool)."""

    path: str
    size: int = Field(ge=0)
    media_type: str
    caption: str | None


class TurnUsage(BaseModel):
    """What one turn cost, from the agent's own result."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    cost_usd: float
    duration_ms: int | None  # null when the agent did not say


class DoneEvent(EventData):
    """The turn finished (terminal). It does not repeat the text."""

    turn_id: str
    usage: TurnUsage | None = None


class InterruptedEvent(EventData):
    """The turn was interrupted (terminal)."""

    turn_id: str


class ErrorEvent(EventData):
    """The turn failed (terminal): e.g. `agent_failed`, `sandbox_spawn_failed`,
    `sandbox_evicted`."""

    code: str
    message: str
    turn_id: str | None = None


class PingEvent(EventData):
    """A heartbeat, every 15 s; it has no `id`."""


EVENT_DATA: dict[str, type[EventData]] = {
    "queued": QueuedEvent,
    "started": StartedEvent,
    "snapshot": SnapshotEvent,
    "assistant_delta": AssistantDeltaEvent,
    "thinking_delta": ThinkingDeltaEvent,
    "tool_call": ToolCallEvent,
    "tool_result": ToolResultEvent,
    "requires_choice": RequiresChoiceEvent,
    "choice_resolved": ChoiceResolvedEvent,
    "file_shared": FileSharedEvent,
    "done": DoneEvent,
    "interrupted": InterruptedEvent,
    "error": ErrorEvent,
    "ping": PingEvent,
}
TERMINAL = frozenset({"done", "interrupted", "error"})


def _frame(name: str, data: type[EventData]) -> type[BaseModel]:
    """The model of one whole event: its name, its resume id and its typed data."""
    frame: type[BaseModel] = create_model(
        data.__name__.removesuffix("Event") + "Frame",
        event=(Literal[name], ...),
        id=(int | None, None),
        data=(data, ...),
    )
    return frame


FRAMES = {name: _frame(name, data) for name, data in EVENT_DATA.items()}
# One of the frames above, told apart by `event` (built from the table: one list of events).
LoopEvent = Annotated[Union[tuple(FRAMES.values())], Field(discriminator="event")]  # type: ignore[valid-type]  # noqa: UP007
_EVENT = TypeAdapter(LoopEvent)


def parse_event(event: str, data: str | dict[str, Any], id: str | int | None = None) -> Any:
    """One SSE frame as its typed model; `ValidationError` for an unknown name or bad data."""
    payload = json.loads(data) if isinstance(data, str) else data
    resume = None if id is None or id == "" else id
    return _EVENT.validate_python({"event": event, "id": resume, "data": payload})
