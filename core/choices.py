"""Choices: a permission prompt or a question the agent waits on, and their answers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Literal

from claude_agent_sdk import PermissionResultAllow, PermissionResultDeny

from core.agent import summarize_input
from core.errors import EngineError
from core.ids import new_id

ChoiceKind = Literal["permission", "question"]

# What a pending choice ends with when nobody answers it.
INTERRUPTED = "interrupted"
EVICTED = "evicted"


@dataclass
class Choice:
    id: str
    kind: ChoiceKind
    payload: dict[str, Any]
    tool_input: dict[str, Any]
    future: asyncio.Future[dict[str, Any] | str] = field(repr=False)

    @property
    def pending(self) -> bool:
        return not self.future.done()


def make_choice(tool: str, tool_input: dict[str, Any], title: str | None) -> Choice:
    future: asyncio.Future[dict[str, Any] | str] = asyncio.get_running_loop().create_future()
    if tool == "AskUserQuestion":
        payload: dict[str, Any] = {"questions": _questions(tool_input)}
        return Choice(new_id("choice"), "question", payload, tool_input, future)
    payload = {
        "tool": tool,
        "input_summary": summarize_input(tool, tool_input),
        "title": title or f"Allow {tool}?",
        "input": tool_input,
    }
    return Choice(new_id("choice"), "permission", payload, tool_input, future)


def _questions(tool_input: dict[str, Any]) -> list[dict[str, Any]]:
    questions = []
    for index, raw in enumerate(tool_input.get("questions") or [], start=1):
        if not isinstance(raw, dict):
            continue
        options = [
            {"label": str(o.get("label", "")), "description": str(o.get("description", ""))}
            for o in raw.get("options") or []
            if isinstance(o, dict)
        ]
        questions.append(
            {
                "id": f"q{index}",
                "question": str(raw.get("question", "")),
                "header": str(raw.get("header", "")),
                "options": options,
                "multi_select": bool(raw.get("multiSelect", False)),
            }
        )
    return questions


def validate_answer(choice: Choice, body: dict[str, Any]) -> dict[str, Any]:
    """Check an answer against the choice; return the answer as recorded in history."""
    if choice.kind == "permission":
        allow = body.get("allow")
        if set(body) != {"allow"} or not isinstance(allow, bool):
            raise _bad('a permission is answered with {"allow": true} or {"allow": false}')
        return {"allow": allow}
    answers = body.get("answers")
    if set(body) != {"answers"} or not isinstance(answers, dict) or not answers:
        raise _bad('a question is answered with {"answers": {"<question id>": "<option label>"}}')
    by_id = {q["id"]: q for q in choice.payload["questions"]}
    for qid, value in answers.items():
        question = by_id.get(qid)
        if question is None:
            raise _bad(f"no question {qid!r} in this choice (ids: {', '.join(by_id)})")
        labels = value if isinstance(value, list) else [value]
        if not labels or not all(isinstance(label, str) and label for label in labels):
            raise _bad(f"the answer to {qid} must be an option label")
        if len(labels) > 1 and not question["multi_select"]:
            raise _bad(f"{qid} takes one option")
    return {"answers": answers}


def decision(
    choice: Choice, outcome: dict[str, Any] | str
) -> PermissionResultAllow | PermissionResultDeny:
    """What the agent is told once the choice ends."""
    if outcome == INTERRUPTED:
        return PermissionResultDeny(message="The turn was interrupted.", interrupt=True)
    if outcome == EVICTED:
        return PermissionResultDeny(message="Nobody answered in time.", interrupt=True)
    assert isinstance(outcome, dict)
    if choice.kind == "permission":
        if outcome["allow"]:
            return PermissionResultAllow(updated_input=choice.tool_input)
        return PermissionResultDeny(message="The user denied this tool use.")
    by_id = {q["id"]: q["question"] for q in choice.payload["questions"]}
    answers = {
        by_id[qid]: ", ".join(value) if isinstance(value, list) else value
        for qid, value in outcome["answers"].items()
    }
    return PermissionResultAllow(updated_input={**choice.tool_input, "answers": answers})


def _bad(message: str) -> EngineError:
    return EngineError("invalid_choice_payload", message)
