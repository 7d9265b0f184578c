"""The agent driver: one warm `ClaudeSDKClient` per active loop.

The SDK client must be connected, read and disconnected from one task, so a
session owns a task that does exactly that and hands every message to the
loop's runtime. Queries, permission-mode changes and interrupts are plain writes
to the CLI's stdin and may come from any task.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ClaudeSDKClient,
    Message,
    ResultMessage,
    StreamEvent,
    SystemMessage,
    ToolResultBlock,
    ToolUseBlock,
    UserMessage,
)

from bridge.contract.models import PermissionMode
from core.tasks import spawn

log = logging.getLogger(__name__)

# A loop's permission mode changes per turn on a warm agent, so `can_use_tool` is
# always installed even when the mode it starts with never consults it.
warnings.filterwarnings("ignore", message="can_use_tool will not be invoked")

OnMessage = Callable[[Message], Awaitable[None]]
OnExit = Callable[[str | None], Awaitable[None]]


class AgentSession:
    """A running agent CLI process and the task that reads from it."""

    def __init__(self, options: ClaudeAgentOptions, on_message: OnMessage, on_exit: OnExit) -> None:
        self._options = options
        self._on_message = on_message
        self._on_exit = on_exit
        self._client: ClaudeSDKClient | None = None
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None
        self._stderr: list[str] = []
        self.permission_mode: PermissionMode = options.permission_mode or "default"
        self._stopping = False

    async def start(self) -> None:
        self._options.stderr = self._keep_stderr
        self._task = spawn(self._own(), "agent-session")
        await asyncio.shield(self._ready)

    async def query(self, prompt: str | list[dict[str, Any]]) -> None:
        """Send a message: plain text, or content blocks (text and images)."""
        assert self._client is not None
        if isinstance(prompt, str):
            await self._client.query(prompt)
        else:
            await self._client.query(_one_message(prompt))

    async def set_permission_mode(self, mode: PermissionMode) -> None:
        if mode != self.permission_mode and self._client is not None:
            await self._client.set_permission_mode(mode)
            self.permission_mode = mode

    async def interrupt(self) -> None:
        if self._client is not None:
            await self._client.interrupt()

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def _keep_stderr(self, line: str) -> None:
        self._stderr = [*self._stderr[-19:], line]

    async def _own(self) -> None:
        failure: str | None = None
        try:
            async with ClaudeSDKClient(self._options) as client:
                self._client = client
                self._ready.set_result(None)
                async for message in client.receive_messages():
                    await self._on_message(message)
            failure = "the agent process ended"
        except asyncio.CancelledError:
            if not self._stopping:
                failure = "the agent was cancelled"
            raise
        except Exception as exc:
            failure = self._describe(exc)
            log.warning("agent session failed: %s", failure)
        finally:
            self._client = None
            if not self._ready.done():
                self._ready.set_exception(RuntimeError(failure or "the agent did not start"))
            if not self._stopping:
                await self._on_exit(failure)

    def _describe(self, exc: Exception) -> str:
        tail = " | ".join(line.strip() for line in self._stderr[-3:] if line.strip())
        text = f"{type(exc).__name__}: {exc}".strip()
        return f"{text} ({tail})" if tail else text


async def _one_message(content: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    # The SDK's streaming input: user messages whose content is a list of blocks.
    yield {
        "type": "user",
        "message": {"role": "user", "content": content},
        "parent_tool_use_id": None,
    }


def summarize_input(tool: str, tool_input: dict[str, Any]) -> str:
    """A one-line human summary of a tool call, e.g. the command of a Bash call."""
    for key in ("command", "file_path", "path", "pattern", "url", "query", "description"):
        value = tool_input.get(key)
        if isinstance(value, str) and value:
            return _clip(value)
    if tool == "AskUserQuestion":
        questions = tool_input.get("questions") or []
        if questions and isinstance(questions[0], dict):
            return _clip(str(questions[0].get("question", "")))
    return _clip(json.dumps(tool_input, separators=(",", ":"), default=str))


def _clip(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def stream_delta(message: StreamEvent) -> tuple[str, str] | None:
    """The visible delta a partial-message event carries: ("assistant"|"thinking", text)."""
    if message.parent_tool_use_id is not None:
        return None
    event = message.event
    if event.get("type") != "content_block_delta":
        return None
    delta = event.get("delta") or {}
    if delta.get("type") == "text_delta" and delta.get("text"):
        return "assistant", delta["text"]
    if delta.get("type") == "thinking_delta" and delta.get("thinking"):
        return "thinking", delta["thinking"]
    return None


def tool_uses(message: AssistantMessage) -> list[ToolUseBlock]:
    if message.parent_tool_use_id is not None:
        return []
    return [block for block in message.content if isinstance(block, ToolUseBlock)]


def tool_results(message: UserMessage) -> list[ToolResultBlock]:
    if message.parent_tool_use_id is not None or isinstance(message.content, str):
        return []
    return [block for block in message.content if isinstance(block, ToolResultBlock)]


def result_error(message: ResultMessage) -> str | None:
    """Why a result failed, or None: the CLI can say `success` and still be an error."""
    if not message.is_error and message.subtype == "success":
        return None
    parts = [*(message.errors or [])]
    if message.result:
        parts.append(message.result)
    if message.api_error_status:
        parts.append(f"model API status {message.api_error_status}")
    return "; ".join(parts) or f"the agent ended with {message.subtype}"


def session_id_of(message: Message) -> str | None:
    if isinstance(message, SystemMessage) and message.subtype == "init":
        return message.data.get("session_id")
    if isinstance(message, ResultMessage):
        return message.session_id
    return None


def starts_activity(message: Message) -> bool:
    """Whether a message seen outside any turn means the agent woke up by itself."""
    if isinstance(message, StreamEvent):
        return message.event.get("type") == "message_start" and message.parent_tool_use_id is None
    if isinstance(message, AssistantMessage):
        return message.parent_tool_use_id is None
    return False
