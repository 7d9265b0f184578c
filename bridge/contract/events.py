"""The typed payloads of the Loop API's stream events, one model per event name.

On the wire each event is an SSE frame, `event: <name>`, `data: <one JSON object>` and,
for every event but `ping`, an `id:`. `EVENT_DATA` maps each name to the model of its
data, `FRAMES` to the model of the whole event (`QueuedFrame`, … with `event`, `id` and
`data`); `LoopEvent` is their union, discriminated on the name, and `parse_event` reads
one SSE frame into it. The client yields these; the server publishes them in its OpenAPI
document.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

Trigger = Literal["message", "background"]


class EventData(BaseModel):
    # Fields may be added to an event later; a client that reads an older model keeps working.
    model_config = ConfigDict(extra="allow")

    # Scripts written against the first client read event data as a JSON object
    # (`event.data["text"]`): those reads keep working, with the wire's values.
    def __getitem__(self, key: str) -> Any:
        return self.model_dump(mode="json")[key]

    def __contains__(self, key: object) -> bool:
        return key in self.model_dump(mode="json")

    def get(self, key: str, default: Any = None) -> Any:
        return self.model_dump(mode="json").get(key, default)


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


# ---- whole events: the name, the resume id and the typed data -------------------------


class Frame(BaseModel):
    """One event as a client reads it. `id` is its resume point (`Last-Event-ID`); a
    `ping` has none."""

    event: str
    id: int | None = None

    @property
    def terminal(self) -> bool:
        """The turn's last event: `done`, `interrupted` or `error`."""
        return self.event in TERMINAL


class QueuedFrame(Frame):
    event: Literal["queued"] = "queued"
    data: QueuedEvent


class StartedFrame(Frame):
    event: Literal["started"] = "started"
    data: StartedEvent


class SnapshotFrame(Frame):
    event: Literal["snapshot"] = "snapshot"
    data: SnapshotEvent


class AssistantDeltaFrame(Frame):
    event: Literal["assistant_delta"] = "assistant_delta"
    data: AssistantDeltaEvent


class ThinkingDeltaFrame(Frame):
    event: Literal["thinking_delta"] = "thinking_delta"
    data: ThinkingDeltaEvent


class ToolCallFrame(Frame):
    event: Literal["tool_call"] = "tool_call"
    data: ToolCallEvent


class ToolResultFrame(Frame):
    event: Literal["tool_result"] = "tool_result"
    data: ToolResultEvent


class RequiresChoiceFrame(Frame):
    event: Literal["requires_choice"] = "requires_choice"
    data: RequiresChoiceEvent


class ChoiceResolvedFrame(Frame):
    event: Literal["choice_resolved"] = "choice_resolved"
    data: ChoiceResolvedEvent


class FileSharedFrame(Frame):
    event: Literal["file_shared"] = "file_shared"
    data: FileSharedEvent


class DoneFrame(Frame):
    event: Literal["done"] = "done"
    data: DoneEvent


class InterruptedFrame(Frame):
    event: Literal["interrupted"] = "interrupted"
    data: InterruptedEvent


class ErrorFrame(Frame):
    event: Literal["error"] = "error"
    data: ErrorEvent


class PingFrame(Frame):
    event: Literal["ping"] = "ping"
    data: PingEvent


# One event, told apart by its name.
LoopEvent = Annotated[
    QueuedFrame
    | StartedFrame
    | SnapshotFrame
    | AssistantDeltaFrame
    | ThinkingDeltaFrame
    | ToolCallFrame
    | ToolResultFrame
    | RequiresChoiceFrame
    | ChoiceResolvedFrame
    | FileSharedFrame
    | DoneFrame
    | InterruptedFrame
    | ErrorFrame
    | PingFrame,
    Field(discriminator="event"),
]
LOOP_EVENT: TypeAdapter[LoopEvent] = TypeAdapter(LoopEvent)
FRAMES: dict[str, type[Frame]] = {
    "queued": QueuedFrame,
    "started": StartedFrame,
    "snapshot": SnapshotFrame,
    "assistant_delta": AssistantDeltaFrame,
    "thinking_delta": ThinkingDeltaFrame,
    "tool_call": ToolCallFrame,
    "tool_result": ToolResultFrame,
    "requires_choice": RequiresChoiceFrame,
    "choice_resolved": ChoiceResolvedFrame,
    "file_shared": FileSharedFrame,
    "done": DoneFrame,
    "interrupted": InterruptedFrame,
    "error": ErrorFrame,
    "ping": PingFrame,
}


# Each event's name and the model of its data.
def _data_model(frame: type[Frame]) -> type[EventData]:
    model = frame.model_fields["data"].annotation
    assert isinstance(model, type) and issubclass(model, EventData)
    return model


EVENT_DATA = {name: _data_model(frame) for name, frame in FRAMES.items()}
# The events that end a turn: one definition for the engine, the client and the adapters.
TERMINAL = frozenset({"done", "interrupted", "error"})


def parse_event(event: str, data: str | dict[str, Any], id: str | int | None = None) -> LoopEvent:
    """One SSE frame as its typed model; `ValidationError` for an unknown name or bad data."""
    payload = json.loads(data) if isinstance(data, str) else data
    resume = None if id is None or id == "" else id
    return LOOP_EVENT.validate_python({"event": event, "id": resume, "data": payload})
