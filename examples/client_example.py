"""A loop and one turn from Python, with `bridge.client.LoopClient`.

    LOOPBRIDGE_API_URL=http://127.0.0.1:8642 LOOPBRIDGE_API_TOKEN=la_… \
        python examples/client_example.py "hello" [--allow]

It creates a loop, sends the message, prints the answer as it streams, answers
the agent's choices (a permission: allowed with --allow, else denied; a question:
its first option), and prints the loop's history at the end. `docs/client.md`
explains each step. Against the demo (`loopbridge demo`), make a token with the
demo's data directory (`export LOOPBRIDGE_HOME=…` as it prints, then
`.venv/bin/loopbridge tokens create --user alice`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys

from bridge.client import LoopApiError, LoopClient
from bridge.contract.events import (
    AssistantDeltaFrame,
    DoneFrame,
    ErrorFrame,
    InterruptedFrame,
    LoopEvent,
    PermissionPayload,
    QuestionPayload,
    RequiresChoiceEvent,
    RequiresChoiceFrame,
    ToolCallFrame,
)


async def main(message: str, allow: bool) -> int:
    url = os.environ.get("LOOPBRIDGE_API_URL", "http://127.0.0.1:8642")
    token = os.environ.get("LOOPBRIDGE_API_TOKEN")
    if not token:
        print("set LOOPBRIDGE_API_TOKEN (loopbridge tokens create --user NAME)", file=sys.stderr)
        return 2
    async with LoopClient(url, token) as client:
        loop = await client.create_loop(title="client example", metadata={"from": "example"})
        print(f"loop {loop.id}")
        # `send` streams the turn to its end; a dropped connection is resumed with the
        # same Idempotency-Key, so the agent never runs the message twice.
        events = client.send(loop.id, message)
        async with contextlib.aclosing(events):
            async for event in events:
                await show(client, loop.id, event, allow)
        history = await client.history(loop.id)
        for turn in history.data:
            print(f"history: {turn.ended}: {turn.assistant_text!r}")
        return 0 if history.data and history.data[-1].ended == "done" else 1


async def show(client: LoopClient, loop_id: str, event: LoopEvent, allow: bool) -> None:
    # Each event is typed (bridge/contract/events.py): match on its model.
    match event:
        case AssistantDeltaFrame(data=data):
            print(data.text, end="", flush=True)
        case ToolCallFrame(data=data):
            print(f"\n[tool {data.tool}: {data.input_summary or ''}]", flush=True)
        case RequiresChoiceFrame(data=RequiresChoiceEvent(payload=PermissionPayload() as asked)):
            print(f"\n[{'allowing' if allow else 'denying'} {asked.tool}]")
            await client.answer_choice(loop_id, event.data.choice_id, allow=allow)
        case RequiresChoiceFrame(data=RequiresChoiceEvent(payload=QuestionPayload() as asked)):
            answers: dict[str, str | list[str]] = {
                q.id: q.options[0].label for q in asked.questions
            }
            print(f"\n[answering {answers}]")
            await client.answer_choice(loop_id, event.data.choice_id, answers=answers)
        case DoneFrame() | InterruptedFrame():
            print(f"\n[{event.event}]")
        case ErrorFrame(data=data):
            print(f"\n[error {data.code}: {data.message}]")


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("message", nargs="?", default="hello")
    parser.add_argument("--allow", action="store_true", help="allow the agent's tool calls")
    args = parser.parse_args()
    try:
        raise SystemExit(asyncio.run(main(args.message, args.allow)))
    except LoopApiError as exc:
        print(f"client_example: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    run()
