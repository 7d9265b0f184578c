"""The one place where adapters read Loop API events: one event applied to the rendering
of a turn (every adapter's, every follower's), and the few facts the followers ask of
an event."""

from __future__ import annotations

from adapters.render import TurnRenderer
from adapters.views import choice_view
from bridge.client import TERMINAL_EVENTS
from bridge.contract.models import StreamEventModel

# Tools whose call is already shown another way (the question's buttons).
QUIET_TOOLS = frozenset({"AskUserQuestion"})


def apply_event(renderer: TurnRenderer, loop_id: str, event: StreamEventModel) -> None:
    """One Loop API event, applied to the turn's rendering."""
    data = event.data
    match event.event:
        case "queued":
            renderer.queued(int(data.get("position", 1)))
        case "started":
            renderer.started()
        case "snapshot":
            renderer.add_text(str(data.get("assistant_text_so_far") or ""))
        case "assistant_delta":
            renderer.add_text(str(data.get("text", "")))
        case "tool_call":
            if data.get("tool") not in QUIET_TOOLS:
                renderer.tool_call(
                    str(data.get("tool_use_id")), str(data.get("tool")), data.get("input_summary")
                )
        case "tool_result":
            renderer.tool_result(str(data.get("tool_use_id")), bool(data.get("ok")))
        case "requires_choice":
            renderer.choice(choice_view(loop_id, data))
        case "choice_resolved":
            renderer.choice_resolved(str(data.get("choice_id")), str(data.get("source") or "api"))
        case "done":
            renderer.finish("done")
        case "interrupted":
            renderer.finish("interrupted", "Stopped.")
        case "error":
            renderer.finish("error", f"Error: {data.get('message') or data.get('code')}")
        case _:
            pass  # thinking is not shown; unknown events are for newer adapters


def ends_turn(event: StreamEventModel) -> bool:
    return event.event in TERMINAL_EVENTS


def is_snapshot(event: StreamEventModel) -> bool:
    """The first event of a watch while a turn runs (its text so far)."""
    return event.event == "snapshot"


def starts_background_turn(event: StreamEventModel) -> bool:
    """A turn that no message started (a background command finished)."""
    return event.event == "started" and event.data.get("trigger") == "background"


def turn_of(event: StreamEventModel) -> str | None:
    """The turn an event belongs to; None when it does not say."""
    value = event.data.get("turn_id")
    return str(value) if value is not None else None
