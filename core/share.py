"""The agent's `share_file` tool: an in-process MCP server given to every agent.

The tool runs in the server (not in the sandbox): it checks the path against the
loop's working directory on the host and tells the runtime, which emits
`file_shared`. It needs no permission in any mode.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from claude_agent_sdk import create_sdk_mcp_server, tool
from claude_agent_sdk.types import McpSdkServerConfig

SERVER = "loopbridge"
SHARE_FILE = "share_file"
# The name the CLI gives the tool (and asks permission for).
SHARE_TOOL = f"mcp__{SERVER}__{SHARE_FILE}"

DESCRIPTION = (
    "Share a file of your working directory with the people in this conversation: they "
    "get it as a download or in their chat. Give its path (relative to the working "
    "directory) and optionally a short caption."
)
SCHEMA = {
    "type": "object",
    "properties": {
        "path": {"type": "string", "description": "the file's path"},
        "caption": {"type": "string", "description": "a short caption for the people"},
    },
    "required": ["path"],
}

Share = Callable[[str, str | None], Awaitable[str]]


def share_server(share: Share) -> McpSdkServerConfig:
    """An MCP server whose one tool calls `share(path, caption)`; what it raises (a
    ValueError with the reason) is an error result to the model."""

    @tool(SHARE_FILE, DESCRIPTION, SCHEMA)
    async def share_file(args: dict[str, Any]) -> dict[str, Any]:
        path, caption = args.get("path"), args.get("caption")
        if not isinstance(path, str) or not (caption is None or isinstance(caption, str)):
            return _result("path and caption must be strings", error=True)
        try:
            return _result(await share(path, caption or None))
        except ValueError as exc:
            return _result(str(exc), error=True)

    return create_sdk_mcp_server(SERVER, tools=[share_file])


def _result(text: str, *, error: bool = False) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "is_error": error}
