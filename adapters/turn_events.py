"""One Loop API event, applied to the rendering of a turn (every adapter's, every follower's)."""

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
            pass  # thinking is not shown
