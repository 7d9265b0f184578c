"""The server's files are its own, and its agents die with it, however it ends."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from core.sandbox.image import podman_argv, podman_env, run
from core.sandbox.podman import SERVER_LABEL
from tests.conftest import Server, start_server, stop_server
from tests.sse import names, turn

BYPASS = {"permission_mode": "bypassPermissions"}
LOOPBRIDGE = [sys.executable, "-m", "bridge.cli"]
# What the issue asks: no agent process left this long after the server is killed.
GRACE_SECONDS = 10.0


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


async def new_loop(server: Server) -> str:
    r = await server.http.post("/loops", json={})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def test_the_data_dir_and_database_are_the_servers_alone(standin, tmp_path: Path) -> None:
    home = tmp_path / "home"
    server = await start_server(home)
    try:
        loop = await new_loop(server)
        assert names(await turn(server.http, loop, "hello"))[-1] == "done"
        data_dir = server.engine.settings.data_dir
        db = data_dir / "loopbridge.db"
        assert mode(data_dir) == 0o700
        for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            assert mode(path) == 0o600, path.name
    finally:
        await stop_server(server)
    # What an older version left open is closed at the next start.
    home.chmod(0o755)
    db.chmod(0o644)
    server = await start_server(home)
    try:
        assert mode(data_dir) == 0o700 and mode(db) == 0o600
    finally:
        await stop_server(server)


# ---- kill -9 ---------------------------------------------------------------------------------


def sandboxes() -> list[object]:
    bubblewrap = pytest.mark.skipif(
        shutil.which("bwrap") is None, reason="bubblewrap is not installed here"
    )
    return ["local", pytest.param("bubblewrap", marks=bubblewrap), "auto"]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path.resolve()  # as the server names it


@pytest.mark.parametrize("sandbox", sandboxes())
async def test_no_agent_outlives_a_killed_server(standin, home: Path, sandbox: str) -> None:
    env = {**os.environ, "LOOPBRIDGE_HOME": str(home), "LOOPBRIDGE_SANDBOX": sandbox}
    token = (await run(*LOOPBRIDGE, "tokens", "create", "--user", "alice", env=env)).split()[-1]
    serve = await asyncio.create_subprocess_exec(
        *LOOPBRIDGE, "serve", "--port", "0", env=env, stdout=asyncio.subprocess.PIPE
    )
    try:
        url = await serving_url(serve)
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
            r = await http.post("/loops", json={})
            busy = r.json()["id"]
            # An agent with a child of its own, and one without.
            evs = await turn(http, busy, "[[bashbg: sleep 300]]", **BYPASS)
            assert names(evs)[-1] == "done"
            r = await http.post("/loops", json={})
            assert names(await turn(http, r.json()["id"], "hello"))[-1] == "done"
        assert processes_of(home), "no agent process to see die"
    finally:
        serve.send_signal(signal.SIGKILL)
        await serve.wait()
    killed = time.monotonic()
    while left := processes_of(home):
        assert time.monotonic() - killed < GRACE_SECONDS, f"left running: {left}"
        await asyncio.sleep(0.2)
    if shutil.which("podman") is not None:
        while await containers_of(home):
            assert time.monotonic() - killed < GRACE_SECONDS, "containers left running"
            await asyncio.sleep(0.2)


async def serving_url(serve: asyncio.subprocess.Process) -> str:
    assert serve.stdout is not None
    while True:
        line = (await asyncio.wait_for(serve.stdout.readline(), 120)).decode()
        assert line, "the server ended before serving"
        if found := re.search(r"(http://\S+/api/v1)", line):
            return found.group(1)


def processes_of(home: Path) -> list[str]:
    """Processes whose command line or environment names this data dir (agents, their
    launchers, sandboxes and children all do), as `pid command`."""
    mark = str(home).encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue  # ended meanwhile
        if mark in cmdline or mark in environ:
            command = cmdline.replace(b"\0", b" ")[:120].decode(errors="replace")
            found.append(f"{proc.name} {command}")
    return found


async def containers_of(home: Path) -> list[str]:
    out = await run(
        *podman_argv(None),
        "ps",
        "-q",
        "--filter",
        f"label={SERVER_LABEL}={home}",
        env=podman_env(),
    )
    return out.split()
