"""What a loop keeps of a tool call for people to read: its input, its output and, for
a file edit, a unified diff; each cut to a size a page can show (and a log can hold)."""

from __future__ import annotations

import difflib
from typing import Any

# A string in a tool's input longer than this is cut (a Write's content, say).
INPUT_TEXT_LIMIT = 4_000
# Lists in a tool's input keep this many items.
INPUT_ITEMS_LIMIT = 100
OUTPUT_LIMIT = 16_000
DIFF_LIMIT = 32_000
EDIT_TOOLS = frozenset({"Write", "Edit", "MultiEdit"})


def clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n… [{len(text) - limit} more characters]"


def clipped_input(value: Any, depth: int = 0) -> Any:
    """The tool's input with long strings and lists cut (its shape kept)."""
    if isinstance(value, str):
        return clip(value, INPUT_TEXT_LIMIT)
    if depth > 8:
        return "…"
    if isinstance(value, dict):
        return {str(k): clipped_input(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        kept = [clipped_input(v, depth + 1) for v in value[:INPUT_ITEMS_LIMIT]]
        if len(value) > INPUT_ITEMS_LIMIT:
            kept.append(f"… [{len(value) - INPUT_ITEMS_LIMIT} more items]")
        return kept
    if value is None or isinstance(value, bool | int | float):
        return value
    return str(value)


def output_text(content: str | list[dict[str, Any]] | None) -> str:
    """A tool result's content as text: its text parts joined, other parts named."""
    if content is None:
        return ""
    if isinstance(content, str):
        return clip(content, OUTPUT_LIMIT)
    parts = []
    for part in content:
        if part.get("type") == "text":
            parts.append(str(part.get("text", "")))
        else:
            parts.append(f"[{part.get('type', 'content')}]")
    return clip("\n".join(parts), OUTPUT_LIMIT)


def edit_diff(tool: str, tool_input: dict[str, Any], result: dict[str, Any] | None) -> str | None:
    """A unified diff of what a Write or Edit did, from the CLI's own account of it
    (`tool_use_result`: its patch, or the file before and after), else from the input."""
    if tool not in EDIT_TOOLS:
        return None
    result = result if isinstance(result, dict) else {}
    path = str(result.get("filePath") or tool_input.get("file_path") or "file")
    hunks = result.get("structuredPatch")
    if isinstance(hunks, list) and hunks:
        text = _from_patch(path, hunks)
    elif tool == "Write":
        before = result.get("originalFile")
        after = result.get("content", tool_input.get("content"))
        text = _unified(path, before if isinstance(before, str) else "", str(after or ""))
    elif tool == "Edit":
        old, new = tool_input.get("old_string"), tool_input.get("new_string")
        if not isinstance(old, str) or not isinstance(new, str):
            return None
        text = _unified(path, old, new)
    else:
        return None
    return clip(text, DIFF_LIMIT) if text else None


def _from_patch(path: str, hunks: list[Any]) -> str:
    lines = [f"--- a/{path}", f"+++ b/{path}"]
    for hunk in hunks:
        if not isinstance(hunk, dict):
            continue
        old = f"{hunk.get('oldStart', 0)},{hunk.get('oldLines', 0)}"
        new = f"{hunk.get('newStart', 0)},{hunk.get('newLines', 0)}"
        lines.append(f"@@ -{old} +{new} @@")
        lines.extend(str(line) for line in hunk.get("lines") or [])
    return "\n".join(lines) + "\n"


def _unified(path: str, before: str, after: str) -> str:
    diff = difflib.unified_diff(
        before.splitlines(),
        after.splitlines(),
        fromfile="/dev/null" if not before else f"a/{path}",
        tofile=f"b/{path}",
        lineterm="",
    )
    return "\n".join(diff) + "\n"
