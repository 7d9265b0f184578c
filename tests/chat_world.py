"""What the chat end-to-end tests share: a server whose settings file names two repos
(a local bare git repository as the remote) and routes channels to them, and ways to
read what the model was given."""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import Server, start_server, stop_server
from tests.test_repo_branch import make_remote

# Channels the settings file routes (Slack channel ids; a Discord channel id).
SLACK_APP_CHANNEL = "C0APP"
DISCORD_APP_CHANNEL = "1390000000000000001"
SHOW_BRANCH = "[[bash: git rev-parse --abbrev-ref HEAD; cat WHICH.txt]]"


def settings_file(root: Path, bare: Path) -> Path:
    config = root / "loopbridge.toml"
    config.write_text(
        f"""
[repos.app]
url = "{bare}"
branch = "release"

[repos.plain]
url = "{bare}"

[routes.slack.{SLACK_APP_CHANNEL}]
repo = "app"
permission_mode = "bypassPermissions"

[routes.discord."{DISCORD_APP_CHANNEL}"]
repo = "app"
permission_mode = "bypassPermissions"
"""
    )
    return config


async def routed_server(standin: object, root: Path) -> AsyncIterator[Server]:
    """A server started with the settings file in LOOPBRIDGE_CONFIG (kept set while it
    runs, so an adapter started meanwhile reads the same routes)."""
    bare = await asyncio.to_thread(make_remote, root)
    config = settings_file(root, bare)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOOPBRIDGE_CONFIG", str(config))
        server = await start_server(root / "home")
        server.standin = standin  # type: ignore[assignment]
        try:
            yield server
        finally:
            await stop_server(server)


def last_user_message(server: Server) -> list[dict]:
    """The content blocks of the newest person's message the model was sent."""
    messages = server.standin_requests()[-1]["messages"]
    for message in reversed(messages):
        if message["role"] != "user":
            continue
        content = message["content"]
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if any(b.get("type") == "text" and not b["text"].startswith("<system") for b in blocks):
            return blocks
    raise AssertionError("no user message")


def user_texts(server: Server, needle: str = "") -> str:
    """Every text the model was sent in person's messages, over all its requests; with
    `needle`, of the newest request that holds it only (the stand-in serves the session)."""
    requests = server.standin_requests()
    if needle:
        requests = [r for r in requests if needle in json.dumps(r)][-1:]
    seen = []
    for request in requests:
        for message in request["messages"]:
            if message["role"] != "user":
                continue
            content = message["content"]
            if isinstance(content, str):
                seen.append(content)
            else:
                seen += [b.get("text", "") for b in content if b.get("type") == "text"]
    return "\n".join(seen)


def png(width: int = 2, height: int = 2) -> bytes:
    """A small real PNG (grey pixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\0" + b"\x80\x80\x80" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
