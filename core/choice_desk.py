"""The choices a loop's turn waits on: asked, answered or ended, and how long they may wait."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from claude_agent_sdk import PermissionResultAllow, PermissionResultDeny

from bridge.contract.events import ChoiceResolvedEvent, RequiresChoiceEvent
from core import tool_record
from core.choices import Choice, decision, make_choice, validate_answer
from core.emitter import Emitter
from core.errors import EngineError
from core.turn import Turn


class ChoiceDesk:
    """Asks the people, takes their answers, and calls `on_expiry` with the turn when
    nobody answers within `wait_seconds` (the sandbox's idle time)."""

    def __init__(
        self, events: Emitter, wait_seconds: float, on_expiry: Callable[[Turn], object]
    ) -> None:
        self._events = events
        self._wait_seconds = wait_seconds
        self._on_expiry = on_expiry
        self._timer: asyncio.TimerHandle | None = None

    async def ask(
        self, turn: Turn, tool: str, tool_input: dict[str, Any], title: str | None
    ) -> PermissionResultAllow | PermissionResultDeny:
        """A choice for a tool call, published; what the agent is told once it ends."""
        choice = make_choice(tool, tool_input, title)
        turn.pending[choice.id] = choice
        event = RequiresChoiceEvent.model_validate(
            {"choice_id": choice.id, "kind": choice.kind, "payload": choice.payload}
        )
        event_id = self._events.emit(event, turn.id)
        turn.choice_marks[choice.id] = {"event_id": event_id, "text_offset": turn.text_length}
        self._arm(turn)
        outcome = await choice.future
        return decision(choice, outcome)

    def answer(
        self,
        turn: Turn | None,
        choice_id: str,
        body: dict[str, Any],
        source: str,
        by: dict[str, str] | None,
    ) -> tuple[Turn, Choice, dict[str, Any]]:
        """Resolve a pending choice of `turn`; `by` [ext] is the person who answered."""
        choice = turn.pending.get(choice_id) if turn else None
        if turn is None or choice is None or not choice.pending:
            raise EngineError("choice_not_found", f"no pending choice {choice_id}")
        answer = validate_answer(choice, body)
        record = {
            "choice_id": choice.id,
            "kind": choice.kind,
            "answer": answer,
            "source": source,
            "payload": tool_record.clipped_input(choice.payload),
            **turn.choice_marks.pop(choice.id, {}),
        }
        if by is not None:
            record["by"] = by
        turn.choices.append(record)
        del turn.pending[choice_id]
        self.cancel_timer()
        self._events.emit(ChoiceResolvedEvent(choice_id=choice_id, source=source), turn.id)
        choice.future.set_result(answer)
        return turn, choice, answer

    @staticmethod
    def end(turn: Turn, outcome: str) -> None:
        """Every pending choice of the turn ends with `outcome`, unanswered."""
        for choice in turn.pending.values():
            if choice.pending:
                choice.future.set_result(outcome)
        turn.pending.clear()

    def _arm(self, turn: Turn) -> None:
        self.cancel_timer()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._wait_seconds, self._on_expiry, turn)

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
