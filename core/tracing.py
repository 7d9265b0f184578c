"""The engine's hook for tracing turns, off unless the server installs a tracer.

`core/` never imports OpenTelemetry: the composition root (bridge/cli/serve.py) sets
`tracer` to a real one when traces are asked for. Off, each turn makes two calls
to a no-op that returns None; nothing is done per event.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.turn import Turn


class TurnTracer:
    """Starts a turn's span when it begins and ends it at its terminal event."""

    def started(self, loop_id: str, turn: Turn) -> Any:
        """The turn's span (whatever `ended` needs), or None."""
        return None

    def ended(self, span: Any, turn: Turn) -> None:
        """`turn.ended` (and `turn.usage` when known) are set by then."""


tracer = TurnTracer()


def set_turn_tracer(chosen: TurnTracer) -> None:
    global tracer
    tracer = chosen
