"""The unprivileged user agents run as when the server is root (local and bubblewrap).

A system user of its own, `loopbridge-agent`, made with `useradd --system` the
first time it is needed: an agent that runs as root could read everything the
server can (its database, settings, other loops).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
from dataclasses import dataclass
from pathlib import Path

from core.errors import EngineError

AGENT_USER = "loopbridge-agent"


@dataclass(frozen=True)
class AgentUser:
    uid: int
    gid: int


async def agent_user() -> AgentUser | None:
    """The user agents run as: None when the server is not root (agents run as the server's
    own user, and only the sandbox keeps them from its files)."""
    if os.geteuid() != 0:
        return None
    found = lookup()
    if found is not None:
        return found
    useradd = shutil.which("useradd")
    if useradd is None:
        raise EngineError("sandbox_spawn_failed", f"no user {AGENT_USER} and no useradd to make it")
    proc = await asyncio.create_subprocess_exec(
        useradd,
        "--system",
        "--user-group",
        "--no-create-home",
        "--home-dir",
        "/nonexistent",
        "--shell",
        "/usr/sbin/nologin",
        AGENT_USER,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    # Another server may have made it in the meantime: look again before failing.
    found = lookup()
    if found is None:
        detail = err.decode(errors="replace").strip() or f"exit {proc.returncode}"
        raise EngineError("sandbox_spawn_failed", f"cannot make the user {AGENT_USER}: {detail}")
    return found


def lookup() -> AgentUser | None:
    try:
        entry = pwd.getpwnam(AGENT_USER)
    except KeyError:
        return None
    return AgentUser(entry.pw_uid, entry.pw_gid)


def give_tree(root: Path, uid: int, gid: int) -> None:
    """Give the loop's files to the agent's user (the server, root, can still use them).

    Skipped when the directory is the agent's already: files the server seeds later
    stay the server's, readable by the agent (as with a container's bind mounts)."""
    if root.stat().st_uid == uid:
        return
    chown_tree(root, uid, gid)


def chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(os.path.join(parent, name), uid, gid, follow_symlinks=False)
