"""The stand-in for the Anthropic Messages API, as a Starlette app and a runner.

It answers what the bundled Claude Code CLI calls when ``ANTHROPIC_BASE_URL`` points
here: ``POST /v1/messages`` (streamed as Anthropic SSE, or a JSON Message when
``stream`` is not true) and ``POST /v1/messages/count_tokens``. Anything else gets a
JSON 404. Each message reports its token usage (in ``message_start`` and
``message_delta``): by default estimated from the request's size and the deltas
sent, or exactly ``StandinModel.usage`` when a test sets it; ``reported`` keeps what
each answer said. API failures (``[[fail]]``, ``[[overloaded]]``) carry no ``x-should-retry``
header, like the real API, so the CLI retries them: bound that with
``CLAUDE_CODE_MAX_RETRIES``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bridge.standin.scenarios import (
    ApiError,
    Block,
    Reply,
    TextBlock,
    ThinkingBlock,
    ToolUseBlock,
    is_side_request,
    respond,
)

DEFAULT_STAMP_DELAY = 0.002
BYTES_PER_TOKEN = 4


class StandinModel:
    """Runs the stand-in on uvicorn inside the current event loop and records requests."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        delta_delay: float = 0.0,
        stamp_delay: float = DEFAULT_STAMP_DELAY,
        usage: dict[str, int] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.delta_delay = delta_delay
        self.stamp_delay = stamp_delay
        # Token counts every answer reports (keys as in the API's `usage`), when set.
        self.usage = usage
        self.url = ""
        self.requests: list[dict[str, Any]] = []
        # When each streamed answer's first delta went out (monotonic clock), so a
        # test or bench can measure what a person waits for from there.
        self.first_deltas: list[float] = []
        # The usage each answer reported, with "side": whether it answered a side call.
        self.reported: list[dict[str, Any]] = []
        self._message_ids = itertools.count(1)
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> str:
        config = uvicorn.Config(
            standin_app(self),
            host=self.host,
            port=self.port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        # Binding here makes a taken port an OSError for the caller, not uvicorn's sys.exit.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.create_server((self.host, self.port), family=family)
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[listener]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("stand-in server stopped before it started")
            await asyncio.sleep(0.005)
        host = f"[{self.host}]" if family == socket.AF_INET6 else self.host
        self.url = f"http://{host}:{listener.getsockname()[1]}"
        return self.url

    async def wait_closed(self) -> None:
        if self._task is not None:
            await self._task

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._server = self._task = None

    def main_requests(self) -> list[dict[str, Any]]:
        """The requests that are conversation turns, not side calls."""
        return [body for body in self.requests if not is_side_request(body)]

    def main_usage(self) -> list[dict[str, int]]:
        """The usage reported for conversation turns' requests, in order."""
        return [
            {k: v for k, v in item.items() if k != "side"}
            for item in self.reported
            if not item["side"]
        ]

    def reset(self) -> None:
        self.requests.clear()
        self.reported.clear()

    def next_message_id(self) -> str:
        return f"msg_standin_{next(self._message_ids):06d}"


def standin_app(model: StandinModel | None = None) -> Starlette:
    """The ASGI app; without a model it uses a fresh, unstarted one for its settings."""
    owner = model or StandinModel()

    async def messages(request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            return _error_response(400, "invalid_request_error", "body is not JSON")
        owner.requests.append(body)
        answer = respond(body, owner.stamp_delay)
        if isinstance(answer, ApiError):
            return JSONResponse(answer.body(), status_code=answer.status)
        message = _MessageFrame(
            owner.next_message_id(), body.get("model", "standin"), raw, owner.usage
        )
        headers = {"request-id": f"req_{message.id}"}
        owner.reported.append(message.record | {"side": is_side_request(body)})
        message.record = owner.reported[-1]
        if not body.get("stream"):
            return JSONResponse(message.complete(answer), headers=headers)
        delay = owner.delta_delay if answer.delay is None else answer.delay
        return StreamingResponse(
            _stream(
                message.events(answer), delay, lambda: owner.first_deltas.append(time.monotonic())
            ),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", **headers},
        )

    async def count_tokens(request: Request) -> Response:
        return JSONResponse({"input_tokens": _estimate_tokens(await request.body())})

    routes = [
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown paths (404) and methods (405) answer as the API would, in JSON."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    kind = "not_found_error" if status == 404 else "invalid_request_error"
    return _error_response(status, kind, f"{request.method} {request.url.path}: {exc}")


def _error_response(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse(ApiError(status, kind, message).body(), status_code=status)


def _estimate_tokens(raw: bytes) -> int:
    return max(1, len(raw) // BYTES_PER_TOKEN)


async def _stream(
    events: Iterator[tuple[bytes, bool]], delay: float, first_delta: Callable[[], None]
) -> AsyncIterator[bytes]:
    """Sends events with ``delay`` between deltas; without a delay, in one write."""
    if delay <= 0:
        body = [event for event, _ in events]
        first_delta()
        yield b"".join(body)
        return
    pending: list[bytes] = []
    first = True
    for event, is_delta in events:
        if is_delta and not first:
            await asyncio.sleep(delay)
        pending.append(event)
        if is_delta:
            if first:
                first_delta()
            first = False
            yield b"".join(pending)
            pending.clear()
    yield b"".join(pending)


class _MessageFrame:
    """One assistant message: its SSE events, or the whole Message as JSON."""

    def __init__(
        self, message_id: str, model: str, raw_request: bytes, usage: dict[str, int] | None
    ) -> None:
        self.id = message_id
        self.model = model
        self.fixed = usage
        self.input_tokens = _estimate_tokens(raw_request)
        # Filled with the final usage once the answer has been sent.
        self.record: dict[str, Any] = {}

    def _start_usage(self) -> dict[str, int]:
        usage = {
            "input_tokens": self.input_tokens,
            "output_tokens": 1,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }
        if self.fixed is not None:
            usage |= {k: v for k, v in self.fixed.items() if k != "output_tokens"}
        return usage

    def final_usage(self, deltas: int) -> dict[str, int]:
        """The usage the answer ends with (what `message_delta` and a JSON Message say);
        without fixed counts, one output token per delta sent."""
        output = deltas
        if self.fixed is not None and "output_tokens" in self.fixed:
            output = self.fixed["output_tokens"]
        usage = self._start_usage() | {"output_tokens": output}
        self.record.update(usage)
        return usage

    def _message(self, content: list[dict[str, Any]], stop_reason: str | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": self._start_usage(),
        }

    def complete(self, reply: Reply) -> dict[str, Any]:
        content = [_complete_block(block) for block in reply.blocks]
        return self._message(content, reply.stop_reason) | {"usage": self.final_usage(1)}

    def events(self, reply: Reply) -> Iterator[tuple[bytes, bool]]:
        """SSE events, each paired with whether it is a content delta."""
        start = {"type": "message_start", "message": self._message([], None)}
        yield _sse("message_start", start), False
        deltas = 0
        for index, block in enumerate(reply.blocks):
            opened = {"type": "content_block_start", "index": index, "content_block": _empty(block)}
            yield _sse("content_block_start", opened), False
            for delta in _deltas(block):
                deltas += 1
                body = {"type": "content_block_delta", "index": index, "delta": delta}
                yield _sse("content_block_delta", body), True
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": index}), False
        end = {
            "type": "message_delta",
            "delta": {"stop_reason": reply.stop_reason, "stop_sequence": None},
            # Like the API: the final counts, input and cache ones repeated.
            "usage": self.final_usage(deltas),
        }
        yield _sse("message_delta", end), False
        yield _sse("message_stop", {"type": "message_stop"}), False


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _empty(block: Block) -> dict[str, Any]:
    match block:
        case TextBlock():
            return {"type": "text", "text": ""}
        case ThinkingBlock():
            return {"type": "thinking", "thinking": "", "signature": ""}
        case ToolUseBlock(name=name, id=tool_id):
            return {"type": "tool_use", "id": tool_id, "name": name, "input": {}}


def _deltas(block: Block) -> Iterator[dict[str, Any]]:
    match block:
        case TextBlock(chunks=chunks):
            for chunk in chunks:
                yield {"type": "text_delta", "text": chunk}
        case ThinkingBlock(chunks=chunks, signature=signature):
            for chunk in chunks:
                yield {"type": "thinking_delta", "thinking": chunk}
            yield {"type": "signature_delta", "signature": signature}
        case ToolUseBlock(input=tool_input):
            encoded = json.dumps(tool_input)
            middle = len(encoded) // 2
            for part in (encoded[:middle], encoded[middle:]):
                yield {"type": "input_json_delta", "partial_json": part}


def _complete_block(block: Block) -> dict[str, Any]:
    match block:
        case TextBlock(chunks=chunks):
            return {"type": "text", "text": "".join(chunks)}
        case ThinkingBlock(chunks=chunks, signature=signature):
            return {"type": "thinking", "thinking": "".join(chunks), "signature": signature}
        case ToolUseBlock(name=name, id=tool_id, input=tool_input):
            return {"type": "tool_use", "id": tool_id, "name": name, "input": tool_input}
