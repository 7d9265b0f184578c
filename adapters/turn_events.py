"""The one place where adapters read Loop API events: one event applied to the rendering
of a turn (every adapter's, every follower's), and the few facts the followers ask of
an event."""

from __future__ import annotations

from adapters.render import TurnRenderer
from adapters.views import choice_view
from bridge.contract.events import (
    AssistantDeltaFrame,
    ChoiceResolvedFrame,
    DoneFrame,
    ErrorFrame,
    InterruptedFrame,
    LoopEvent,
    QueuedFrame,
    RequiresChoiceFrame,
    SnapshotFrame,
    StartedFrame,
    ToolCallFrame,
    ToolResultFrame,
)

# Tools whose call is already shown another way (the question's buttons).
QUIET_TOOLS = frozenset({"AskUserQuestion"})


def apply_event(renderer: TurnRenderer, loop_id: str, event: LoopEvent) -> None:
    """One Loop API event, applied to the turn's rendering."""
    match event:
        case QueuedFrame(data=data):
            renderer.queued(data.position)
        case StartedFrame():
            renderer.started()
        case SnapshotFrame(data=data):
            renderer.add_text(data.assistant_text_so_far)
        case AssistantDeltaFrame(data=data):
            renderer.add_text(data.text)
        case ToolCallFrame(data=data):
            if data.tool not in QUIET_TOOLS:
                renderer.tool_call(data.tool_use_id, data.tool, data.input_summary)
        case ToolResultFrame(data=data):
            renderer.tool_result(data.tool_use_id, data.ok)
        case RequiresChoiceFrame(data=data):
            renderer.choice(choice_view(loop_id, data.model_dump()))
        case ChoiceResolvedFrame(data=data):
            renderer.choice_resolved(data.choice_id, data.source or "api")
        case DoneFrame():
            renderer.finish("done")
        case InterruptedFrame():
            renderer.finish("interrupted", "Stopped.")
        case ErrorFrame(data=data):
            renderer.finish("error", f"Error: {data.message or data.code}")
        case _:
            pass  # thinking is not shown; unknown events are for newer adapters


def ends_turn(event: LoopEvent) -> bool:
    return event.terminal


def is_snapshot(event: LoopEvent) -> bool:
    """The first event of a watch while a turn runs (its text so far)."""
    return isinstance(event, SnapshotFrame)


def starts_background_turn(event: LoopEvent) -> bool:
    """A turn that no message started (a background command finished)."""
    return isinstance(event, StartedFrame) and event.data.trigger == "background"


def turn_of(event: LoopEvent) -> str | None:
    """The turn an event belongs to; None when it does not say."""
    turn_id: str | None = getattr(event.data, "turn_id", None)
    return turn_id
