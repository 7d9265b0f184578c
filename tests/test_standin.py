"""The stand-in model, driving the real bundled Claude Code CLI offline."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ClaudeSDKClient,
    PermissionResultAllow,
    ResultMessage,
    StreamEvent,
    TextBlock,
    ThinkingBlock,
    ToolPermissionContext,
)

from bridge.standin import StandinModel
from bridge.standin.scenarios import BACKGROUND_DONE, long_chunks

ROOT = Path(__file__).resolve().parents[1]
BACKGROUND_WAKE_TIMEOUT = 20.0


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def standin() -> AsyncIterator[StandinModel]:
    model = StandinModel()
    await model.start()
    yield model
    await model.stop()


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    path = tmp_path / "cwd"
    path.mkdir()
    return path


async def allow_everything(
    tool: str, tool_input: dict[str, Any], context: ToolPermissionContext
) -> PermissionResultAllow:
    if tool == "AskUserQuestion":
        return PermissionResultAllow(
            updated_input={**tool_input, "answers": {"Which color?": "Blue"}}
        )
    return PermissionResultAllow(updated_input=tool_input)


def options(standin: StandinModel, cwd: Path) -> ClaudeAgentOptions:
    home = cwd.parent / "home"
    home.mkdir(exist_ok=True)
    env = {
        "ANTHROPIC_BASE_URL": standin.url,
        "ANTHROPIC_API_KEY": "sk-standin",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CLAUDE_CODE_MAX_RETRIES": "0",
        "HOME": str(home),
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        "IS_SANDBOX": "1",
    }
    return ClaudeAgentOptions(
        include_partial_messages=True, env=env, cwd=str(cwd), can_use_tool=allow_everything
    )


@dataclass
class Turn:
    text_deltas: list[str] = field(default_factory=list)
    thinking_deltas: list[str] = field(default_factory=list)
    assistant: list[AssistantMessage] = field(default_factory=list)
    result: ResultMessage | None = None

    def add(self, message: Any) -> None:
        match message:
            case StreamEvent(event={"type": "content_block_delta", "delta": delta}):
                if delta["type"] == "text_delta":
                    self.text_deltas.append(delta["text"])
                elif delta["type"] == "thinking_delta":
                    self.thinking_deltas.append(delta["thinking"])
            case AssistantMessage():
                self.assistant.append(message)
            case ResultMessage():
                self.result = message

    @property
    def text(self) -> str:
        """The text of the turn's last answer."""
        blocks = [b for m in self.assistant for b in m.content if isinstance(b, TextBlock)]
        return blocks[-1].text if blocks else ""


async def run_turn(client: ClaudeSDKClient, prompt: str) -> Turn:
    await client.query(prompt)
    turn = Turn()
    async for message in client.receive_response():
        turn.add(message)
    assert turn.result is not None
    return turn


async def test_echo_keeps_the_conversation(standin: StandinModel, cwd: Path) -> None:
    async with ClaudeSDKClient(options(standin, cwd)) as client:
        first = await run_turn(client, "hello there")
        second = await run_turn(client, "and again")
    assert first.text == "Echo #1: hello there"
    assert len(first.text_deltas) >= 3
    assert "".join(first.text_deltas) == first.text
    assert second.text == "Echo #2: and again"
    assert second.result is not None and not second.result.is_error


async def test_think_streams_a_thinking_block(standin: StandinModel, cwd: Path) -> None:
    async with ClaudeSDKClient(options(standin, cwd)) as client:
        turn = await run_turn(client, "[[think]]")
    thinking = [b for m in turn.assistant for b in m.content if isinstance(b, ThinkingBlock)]
    assert thinking and thinking[0].thinking == "".join(turn.thinking_deltas)
    assert thinking[0].signature == "standin-signature"
    assert turn.text == "Thought about it."


async def test_bash_runs_and_reports_failure(standin: StandinModel, cwd: Path) -> None:
    async with ClaudeSDKClient(options(standin, cwd)) as client:
        ok = await run_turn(client, "[[bash: echo made > made.txt && echo wrote it]]")
        failed = await run_turn(client, "[[bash: false]]")
    assert (cwd / "made.txt").read_text() == "made\n"
    assert ok.text == "Tool ok: wrote it"
    assert failed.text.startswith("Tool failed: Exit code 1")


async def test_ask_gets_the_answer(standin: StandinModel, cwd: Path) -> None:
    async with ClaudeSDKClient(options(standin, cwd)) as client:
        turn = await run_turn(client, "[[ask]]")
    assert turn.text.startswith("You chose:")
    assert '"Which color?"="Blue"' in turn.text


async def test_write_creates_the_file(standin: StandinModel, cwd: Path) -> None:
    async with ClaudeSDKClient(options(standin, cwd)) as client:
        turn = await run_turn(client, "[[write: hello.txt :: hello from the stand-in]]")
    assert turn.text == "Wrote hello.txt."
    assert (cwd / "hello.txt").read_text() == "hello from the stand-in"


async def test_long_streams_exactly_n_deltas(standin: StandinModel, cwd: Path) -> None:
    async with ClaudeSDKClient(options(standin, cwd)) as client:
        turn = await run_turn(client, "[[long: 50]]")
    expected = "".join(long_chunks(50))
    assert len(turn.text_deltas) == 50
    assert "".join(turn.text_deltas) == expected == turn.text
    assert expected.count("```") % 2 == 0


async def test_fail_ends_the_turn_in_error(standin: StandinModel, cwd: Path) -> None:
    async with ClaudeSDKClient(options(standin, cwd)) as client:
        failed = await run_turn(client, "[[fail]]")
        # The CLI merges this prompt into the failed one's user message.
        after = await run_turn(client, "after the failure")
    assert failed.result is not None and failed.result.is_error
    assert after.text == "Echo #2: after the failure"


async def test_slow_can_be_interrupted(standin: StandinModel, cwd: Path) -> None:
    async with ClaudeSDKClient(options(standin, cwd)) as client:
        await client.query("[[slow: 3]]")
        interrupted = Turn()
        async for message in client.receive_response():
            interrupted.add(message)
            if len(interrupted.text_deltas) == 2:
                await client.interrupt()
        after = await run_turn(client, "after the interrupt")
    assert interrupted.text_deltas == ["slow 1/10. ", "slow 2/10. "]
    assert interrupted.result is not None and interrupted.result.is_error
    assert after.text == "Echo #2: after the interrupt"


async def test_background_bash_wakes_the_agent(standin: StandinModel, cwd: Path) -> None:
    async with ClaudeSDKClient(options(standin, cwd)) as client:
        started = await run_turn(client, "[[bashbg: sleep 1; echo done]]")
        wake = Turn()
        async with asyncio.timeout(BACKGROUND_WAKE_TIMEOUT):
            async for message in client.receive_messages():
                wake.add(message)
                if wake.result is not None:
                    break
    assert started.text == "Started in background."
    assert wake.text == BACKGROUND_DONE
    notification = standin.main_requests()[-1]["messages"][-1]["content"][0]["text"]
    assert "<task-notification>" in notification


# --- the HTTP surface, without the CLI ---------------------------------------------------


def request(prompt: str, **extra: Any) -> dict[str, Any]:
    body = {
        "model": "standin",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": prompt}],
    }
    return {"tools": [{"name": "Bash"}], **body, **extra}


def sse_data(raw: str) -> list[dict[str, Any]]:
    lines = raw.splitlines()
    assert [line for line in lines if line.startswith("event:")], "event: lines are required"
    return [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]


async def test_json_message_count_tokens_and_unknown_path(standin: StandinModel) -> None:
    async with httpx.AsyncClient(base_url=standin.url) as http:
        message = await http.post("/v1/messages", json=request("[[think]]"))
        tokens = await http.post("/v1/messages/count_tokens", json=request("hello"))
        missing = await http.get("/v1/models")
    assert [block["type"] for block in message.json()["content"]] == ["thinking", "text"]
    assert tokens.json()["input_tokens"] > 0
    assert missing.status_code == 404 and missing.json()["type"] == "error"


async def test_overloaded_answers_529(standin: StandinModel) -> None:
    async with httpx.AsyncClient(base_url=standin.url) as http:
        answer = await http.post("/v1/messages", json=request("[[overloaded]]", stream=True))
    assert answer.status_code == 529
    assert answer.json()["error"]["type"] == "overloaded_error"


async def test_side_call_answers_the_asked_json_schema(standin: StandinModel) -> None:
    schema = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}
    body = request("[[fail]] name this", stream=True, tools=[])
    body["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
    standin.reset()
    async with httpx.AsyncClient(base_url=standin.url) as http:
        answer = await http.post("/v1/messages?beta=true", json=body)
    text = "".join(
        e["delta"]["text"]
        for e in sse_data(answer.text)
        if e["type"].endswith("delta") and "text" in e["delta"]
    )
    assert set(json.loads(text)) == {"title"}
    assert len(standin.requests) == 1 and standin.main_requests() == []


async def test_stamped_deltas_carry_increasing_send_times(standin: StandinModel) -> None:
    async with httpx.AsyncClient(base_url=standin.url) as http:
        answer = await http.post("/v1/messages", json=request("[[stamped: 20]]", stream=True))
    deltas = [
        e["delta"]["text"] for e in sse_data(answer.text) if e["type"] == "content_block_delta"
    ]
    stamps = [float(delta.rstrip(";")) for delta in deltas]
    assert len(stamps) == 20 and stamps == sorted(stamps)
    assert stamps[-1] - stamps[0] >= 19 * 0.002 * 0.9


async def test_runs_standalone_and_prints_its_url() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge.standin",
        "--port",
        "0",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        url = (await asyncio.wait_for(process.stdout.readline(), 10)).decode().strip()
        async with httpx.AsyncClient(base_url=url) as http:
            answer = await http.post("/v1/messages", json=request("hi"))
        assert answer.json()["content"][0]["text"] == "Echo #1: hi"
    finally:
        process.terminate()
        await process.wait()
