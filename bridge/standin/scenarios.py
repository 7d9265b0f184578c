"""Scripted answers of the stand-in model, chosen by a marker in the person's text.

A scenario is picked by a marker in the most recent text that a person typed:
``[[name]]`` or ``[[name: argument]]`` (the argument is the rest up to ``]]``, so it
cannot hold ``]]`` itself). No marker, or an unknown name, picks ``echo``. When the
request ends with a tool_result, the same scenario goes on from that result.

What the bundled CLI (2.1.33x) sends, as observed:

- Each human prompt is a text block of a user message; the CLI adds machine text
  blocks (``<system-reminder>`` …, ``[Request interrupted by user]``) and merges a new
  prompt into the previous user message when no answer came between them (after an
  API failure or an interrupt). So a person's texts are counted per text block.
- The system prompt travels partly in ``system`` and partly as ``role: system``
  entries of ``messages``.
- Side calls carry ``tools: []``; with nonessential traffic allowed, the CLI asks for a
  session title once, with ``output_config.format`` = a JSON schema ``{"title": str}``.
  It never called ``count_tokens`` in these runs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

MARKER = re.compile(r"\[\[\s*([A-Za-z_][\w-]*)\s*(?::\s*(.*?))?\s*\]\]", re.DOTALL)
# The line the engine puts before a message that names its author: not typed by the person.
ATTRIBUTION = re.compile(r"\A\[from [^\n]*\]\n")
DEFAULT_LONG_DELTAS = 2000
DEFAULT_STAMPED_DELTAS = 100
DEFAULT_SLOW_SECONDS = 3.0
SLOW_DELTAS = 10
RESULT_PREVIEW = 200
SIDE_ANSWER = "Stand-in side answer."
BACKGROUND_DONE = "Background task finished."
ASK_QUESTION = {
    "question": "Which color?",
    "header": "Color",
    "options": [
        {"label": "Red", "description": "warm"},
        {"label": "Blue", "description": "cool"},
    ],
    "multiSelect": False,
}
# Text blocks the CLI itself writes into user messages; none of them is typed by a person.
MACHINE_TEXT_PREFIXES = (
    "<system-reminder>",
    "<task-notification>",
    "<local-command-",
    "<command-",
    "[Request interrupted by user",
    # After a ToolSearch result (its content: tool_reference blocks).
    "Tool loaded.",
    # Beside an image a message carries: where the CLI saved a copy.
    "[Image: source:",
)


def _new_tool_id() -> str:
    return f"toolu_standin_{uuid.uuid4().hex[:20]}"


@dataclass(frozen=True)
class TextBlock:
    # Iterated lazily while streaming, so a chunk can be computed at the moment it is sent.
    chunks: Iterable[str]


@dataclass(frozen=True)
class ThinkingBlock:
    chunks: Sequence[str]
    signature: str = "standin-signature"


@dataclass(frozen=True)
class ToolUseBlock:
    name: str
    input: dict[str, Any]
    id: str = field(default_factory=_new_tool_id)


Block = TextBlock | ThinkingBlock | ToolUseBlock


@dataclass(frozen=True)
class Reply:
    blocks: Sequence[Block]
    # Seconds between deltas; None leaves it to the model's configured pacing.
    delay: float | None = None

    @property
    def stop_reason(self) -> str:
        if any(isinstance(block, ToolUseBlock) for block in self.blocks):
            return "tool_use"
        return "end_turn"


@dataclass(frozen=True)
class ApiError:
    status: int
    type: str
    message: str

    def body(self) -> dict[str, Any]:
        return {"type": "error", "error": {"type": self.type, "message": self.message}}


@dataclass(frozen=True)
class ToolResult:
    text: str
    is_error: bool
    tool: str | None = None  # the name of the tool_use it answers


@dataclass(frozen=True)
class Image:
    media_type: str
    data: bytes


@dataclass(frozen=True)
class Context:
    """What a scenario sees of one request."""

    human_text: str
    argument: str | None
    human_count: int
    tool_result: ToolResult | None
    stamp_delay: float
    # Tools the request offers by schema, and deferred ones it only names (see ``share``).
    tools: tuple[str, ...] = ()
    deferred: tuple[str, ...] = ()
    # Images in the person's latest message.
    images: tuple[Image, ...] = ()


Scenario = Callable[[Context], Reply | ApiError]


def text_reply(text: str, pieces: int = 1) -> Reply:
    return Reply([TextBlock(split_evenly(text, pieces))])


def split_evenly(text: str, pieces: int) -> list[str]:
    count = max(1, min(pieces, len(text)))
    size, extra = divmod(len(text), count)
    chunks, start = [], 0
    for index in range(count):
        end = start + size + (1 if index < extra else 0)
        chunks.append(text[start:end])
        start = end
    return chunks


def _preview(result: ToolResult) -> str:
    return result.text[:RESULT_PREVIEW]


def echo(ctx: Context) -> Reply:
    return text_reply(f"Echo #{ctx.human_count}: {ctx.human_text}", pieces=4)


def think(ctx: Context) -> Reply:
    thinking = ThinkingBlock(["Let me ", "think about ", "this carefully."])
    return Reply([thinking, TextBlock(["Thought ", "about it."])])


def long_chunks(count: int) -> list[str]:
    """The deterministic Markdown answer of ``[[long: N]]`` as exactly ``count`` chunks."""
    chunks: list[str] = []
    open_fence = False
    for chunk, inside_fence in _markdown_pieces():
        if len(chunks) == count:
            break
        chunks.append(chunk)
        open_fence = inside_fence
    if chunks and open_fence:
        chunks[-1] += "```\n"
    return chunks


def _markdown_pieces() -> Iterator[tuple[str, bool]]:
    """Short pieces of Markdown, each with whether a code fence is open after it."""
    part = 0
    while True:
        part += 1
        yield f"## Part {part}\n\n", False
        yield f"Part {part} has **bold** words, ", False
        yield "some `inline code` ", False
        yield "and a list:\n\n", False
        for item in range(1 + part % 3):
            yield f"- item {part}.{item}\n", False
        yield "\n```python\n", True
        # Code blocks of varied length, some long enough to straddle any split point.
        for line in range(2 + (part * 7) % 80):
            yield f"value_{part}_{line} = {part} * {line}  # line {line}\n", True
        yield "```\n\n", False


def long(ctx: Context) -> Reply:
    count = _int_argument(ctx.argument, DEFAULT_LONG_DELTAS)
    return Reply([TextBlock(long_chunks(count))])


def stamped(ctx: Context) -> Reply:
    count = _int_argument(ctx.argument, DEFAULT_STAMPED_DELTAS)
    return Reply([TextBlock(_stamps(count))], delay=ctx.stamp_delay)


def _stamps(count: int) -> Iterator[str]:
    for _ in range(count):
        yield f"{time.time():.6f};"


def slow(ctx: Context) -> Reply:
    seconds = _float_argument(ctx.argument, DEFAULT_SLOW_SECONDS)
    chunks = [f"slow {index + 1}/{SLOW_DELTAS}. " for index in range(SLOW_DELTAS)]
    return Reply([TextBlock(chunks)], delay=seconds / SLOW_DELTAS)


def bash(ctx: Context) -> Reply:
    if ctx.tool_result is None:
        command = ctx.argument or "true"
        return _tool("Bash", {"command": command, "description": "run command"})
    return _tool_outcome(ctx.tool_result)


def bashbg(ctx: Context) -> Reply:
    """A background Bash; its completion later wakes the agent with no human message.

    Observed: the tool_result reads "Command running in background with ID: <id>.
    Output is being written to: <file>. You will be notified when it completes. …".
    When the command ends, the SDK yields, outside any query: TaskUpdatedMessage
    (status completed), TaskNotificationMessage, SystemMessage
    ``background_tasks_changed``, SystemMessage ``init``, then a new model request
    whose last user message is one text block ``<system-reminder>\n[SYSTEM
    NOTIFICATION - NOT USER INPUT] … <task-notification><task-id>…</task-id>
    <tool-use-id>…</tool-use-id><output-file>…</output-file><status>completed</status>
    <summary>Background command "run command" completed (exit code 0)</summary>
    </task-notification></system-reminder>``; ``respond`` answers it with
    ``BACKGROUND_DONE``, then an AssistantMessage and a ResultMessage follow.
    """
    if ctx.tool_result is None:
        command = ctx.argument or "true"
        tool_input = {"command": command, "description": "run command", "run_in_background": True}
        return _tool("Bash", tool_input)
    if ctx.tool_result.is_error:
        return text_reply(f"Tool failed: {_preview(ctx.tool_result)}")
    return text_reply("Started in background.")


def write(ctx: Context) -> Reply:
    """``[[write: PATH :: CONTENT]]``; the CLI resolves a relative PATH against its cwd."""
    path, _, content = (ctx.argument or "").partition("::")
    path, content = path.strip(), content.strip()
    if ctx.tool_result is None:
        return _tool("Write", {"file_path": path, "content": content})
    if ctx.tool_result.is_error:
        return text_reply(f"Write failed: {_preview(ctx.tool_result)}")
    return text_reply(f"Wrote {path}.")


def ask(ctx: Context) -> Reply:
    """An AskUserQuestion, then the answer as its tool_result carries it.

    Observed, when ``can_use_tool`` allows with ``answers={"Which color?": "Blue"}``: a
    tool_result (no ``is_error``) whose text is ``Your questions have been answered:
    "Which color?"="Blue". You can now continue with these answers in mind.``
    """
    if ctx.tool_result is None:
        return _tool("AskUserQuestion", {"questions": [ASK_QUESTION]})
    return text_reply(f"You chose: {ctx.tool_result.text}")


def share(ctx: Context) -> Reply:
    """``[[share: PATH :: CAPTION]]``: the agent's share_file tool, called as a model must.

    Observed: the CLI offers SDK MCP tools as *deferred* tools. A ``role: system`` entry
    says "The following deferred tools are now available via ToolSearch. …" and names
    each on its own line (``mcp__loopbridge__share_file``); they have no schema in
    ``tools`` until the model calls ``ToolSearch`` with ``select:<name>``, whose result
    holds their definitions in a ``<functions>`` block. Then the tool is called by that
    name like any other.
    """
    path, _, caption = (ctx.argument or "").partition("::")
    name = next((n for n in (*ctx.tools, *ctx.deferred) if n.endswith("__share_file")), None)
    if name is None:
        return text_reply("No share_file tool is listed.")
    tool_input = {"path": path.strip(), **({"caption": caption.strip()} if caption.strip() else {})}
    result = ctx.tool_result
    if result is None:
        if name in ctx.tools:
            return _tool(name, tool_input)
        return _tool("ToolSearch", {"query": f"select:{name}"})
    if result.tool == "ToolSearch":
        if result.is_error or name not in result.text:
            return text_reply(f"ToolSearch did not load {name}: {_preview(result)}")
        return _tool(name, tool_input)
    verdict = "Share failed" if result.is_error else "Shared"
    return text_reply(f"{verdict}: {_preview(result)}")


def image(ctx: Context) -> Reply:
    """``[[image]]``: says what images the person's message holds (type, size, digest)."""
    if not ctx.images:
        return text_reply("I see no image.")
    seen = [
        f"{img.media_type} {len(img.data)} bytes sha256={hashlib.sha256(img.data).hexdigest()}"
        for img in ctx.images
    ]
    return text_reply(f"I see {len(seen)} image(s): " + "; ".join(seen))


def edit(ctx: Context) -> Reply:
    """``[[edit: PATH :: OLD :: NEW]]``: Read the file (the CLI edits only files it has
    read), Edit OLD into NEW, then say so."""
    path, _, rest = (ctx.argument or "").partition("::")
    old, _, new = rest.partition("::")
    path, old, new = path.strip(), old.strip(), new.strip()
    result = ctx.tool_result
    if result is None:
        return _tool("Read", {"file_path": path})
    if result.tool == "Read" and not result.is_error:
        return _tool("Edit", {"file_path": path, "old_string": old, "new_string": new})
    if result.is_error:
        return text_reply(f"Edit failed: {_preview(result)}")
    return text_reply(f"Edited {path}.")


def html(ctx: Context) -> Reply:
    """An answer full of markup a page must show as text, never run."""
    return text_reply(
        "Here is <script>alert(1)</script> and <img src=x onerror=alert(1)> "
        'and <a href="javascript:alert(1)">a link</a>.\n\n'
        "```html\n<script>alert(2)</script>\n```\n",
        pieces=6,
    )


def fail(ctx: Context) -> ApiError:
    return ApiError(500, "api_error", "stand-in failure")


def overloaded(ctx: Context) -> ApiError:
    return ApiError(529, "overloaded_error", "stand-in overloaded")


SCENARIOS: dict[str, Scenario] = {
    "echo": echo,
    "think": think,
    "long": long,
    "stamped": stamped,
    "slow": slow,
    "bash": bash,
    "bashbg": bashbg,
    "write": write,
    "ask": ask,
    "share": share,
    "image": image,
    "edit": edit,
    "html": html,
    "fail": fail,
    "overloaded": overloaded,
}


def _tool(name: str, tool_input: dict[str, Any]) -> Reply:
    return Reply([ToolUseBlock(name, tool_input)])


def _tool_outcome(result: ToolResult) -> Reply:
    verdict = "Tool failed" if result.is_error else "Tool ok"
    return text_reply(f"{verdict}: {_preview(result)}")


def _int_argument(argument: str | None, default: int) -> int:
    return int(argument) if argument and argument.strip().isdigit() else default


def _float_argument(argument: str | None, default: float) -> float:
    try:
        return float(argument) if argument else default
    except ValueError:
        return default


# --- reading a request -----------------------------------------------------------------


def is_side_request(body: dict[str, Any]) -> bool:
    """Calls such as title generation carry no tools; they are not conversation turns."""
    return not body.get("tools")


def respond(body: dict[str, Any], stamp_delay: float) -> Reply | ApiError:
    """The stand-in's answer to one /v1/messages request."""
    if is_side_request(body):
        return text_reply(side_answer(body))
    messages = [m for m in body.get("messages", []) if m.get("role") in ("user", "assistant")]
    if messages and _is_notification(messages[-1]):
        return text_reply(BACKGROUND_DONE)
    human = human_texts(messages)
    typed = human[-1] if human else ""
    marker = MARKER.search(typed)
    name, argument = (marker.group(1), marker.group(2)) if marker else ("echo", None)
    scenario = SCENARIOS.get(name, echo)
    ctx = Context(
        human_text=typed,
        argument=argument,
        human_count=len(human),
        tool_result=_trailing_tool_result(messages),
        stamp_delay=stamp_delay,
        tools=tuple(t["name"] for t in body.get("tools") or [] if isinstance(t.get("name"), str)),
        deferred=deferred_tools(body),
        images=_latest_images(messages),
    )
    return scenario(ctx)


def side_answer(body: dict[str, Any]) -> str:
    """Plain text, or JSON that fits the schema a side call asks for (title generation does)."""
    output_format = (body.get("output_config") or {}).get("format") or {}
    if output_format.get("type") == "json_schema":
        return json.dumps(_sample(output_format.get("schema") or {}))
    return SIDE_ANSWER


def _sample(schema: dict[str, Any]) -> Any:
    match schema.get("type"):
        case "object":
            properties = schema.get("properties") or {}
            return {name: _sample(properties.get(name, {})) for name in schema.get("required", [])}
        case "array":
            return []
        case "number" | "integer":
            return 0
        case "boolean":
            return False
        case _:
            return SIDE_ANSWER


def _blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return content or []


def human_texts(messages: list[dict[str, Any]]) -> list[str]:
    """Every text a person typed, oldest first.

    The CLI merges a new prompt into the previous user message when no answer came
    between them (after an API failure), so each text block counts, not each message.
    """
    return [
        ATTRIBUTION.sub("", block["text"].strip())
        for message in messages
        if message.get("role") == "user"
        for block in _blocks(message)
        if block.get("type") == "text" and block["text"].strip()
        if not _is_machine_text(block["text"])
    ]


def _is_machine_text(text: str) -> bool:
    return text.lstrip().startswith(MACHINE_TEXT_PREFIXES)


def _is_notification(message: dict[str, Any]) -> bool:
    """A background task's wake-up: a user message with a notification and no typed text."""
    if message.get("role") != "user" or human_texts([message]):
        return False
    return any(
        block.get("type") == "text" and "<task-notification>" in block.get("text", "")
        for block in _blocks(message)
    )


def _trailing_tool_result(messages: list[dict[str, Any]]) -> ToolResult | None:
    if not messages or messages[-1].get("role") != "user":
        return None
    for block in _blocks(messages[-1]):
        if block.get("type") == "tool_result":
            tool = _tool_name(messages[:-1], block.get("tool_use_id"))
            return ToolResult(_result_text(block.get("content")), bool(block.get("is_error")), tool)
    return None


def _tool_name(messages: list[dict[str, Any]], tool_use_id: Any) -> str | None:
    for message in reversed(messages):
        for block in _blocks(message):
            if block.get("type") == "tool_use" and block.get("id") == tool_use_id:
                return block.get("name")
    return None


DEFERRED_HEADER = "deferred tools are now available via ToolSearch"


def deferred_tools(body: dict[str, Any]) -> tuple[str, ...]:
    """The tool names the CLI lists as deferred (loadable through ToolSearch)."""
    texts = [body.get("system")] + [
        m.get("content") for m in body.get("messages", []) if m.get("role") == "system"
    ]
    names: list[str] = []
    for text in _all_text(texts):
        at = text.find(DEFERRED_HEADER)
        if at < 0:
            continue
        listing = text[at:].split(":\n", 1)[-1]
        for line in listing.splitlines():
            if not line.strip():
                break
            names.append(line.strip())
    return tuple(names)


def _all_text(items: list[Any]) -> Iterator[str]:
    for item in items:
        if isinstance(item, str):
            yield item
        elif isinstance(item, list):
            for block in item:
                if isinstance(block, dict) and isinstance(block.get("text"), str):
                    yield block["text"]


def _latest_images(messages: list[dict[str, Any]]) -> tuple[Image, ...]:
    """The images of the newest user message that holds text a person typed."""
    for message in reversed(messages):
        if message.get("role") == "user" and human_texts([message]):
            return tuple(
                Image(source.get("media_type", ""), base64.b64decode(source.get("data", "")))
                for block in _blocks(message)
                if block.get("type") == "image"
                and (source := block.get("source") or {}).get("type") == "base64"
            )
    return ()


def _result_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        # ToolSearch answers with tool_reference blocks: each names a tool it loaded.
        return "\n".join(
            part.get("text", "") if part.get("type") == "text" else part.get("tool_name", "")
            for part in content
            if part.get("type") in ("text", "tool_reference")
        )
    return ""
