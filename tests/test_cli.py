"""The `loopbridge` command line, run as a person would run it."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

import httpx
import pytest

from bridge.net import listen
from tests.sse import text_of, turn

LOOPBRIDGE = [sys.executable, "-m", "bridge.cli"]


def run(home, *args, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LOOPBRIDGE, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LOOPBRIDGE_HOME": str(home), **env},
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("loopbridge: ")
    return lines[0]


def test_tokens_create_list_revoke(tmp_path):
    created = run(tmp_path, "tokens", "create", "--user", "bob", "--label", "ci")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"la_[0-9a-f]{48}", token)
    token_id = re.search(r"tok_[0-9a-f]{12}", created.stdout).group(0)

    listed = run(tmp_path, "tokens", "list", "--user", "bob")
    assert listed.returncode == 0
    assert token_id in listed.stdout and "\tci\t" in listed.stdout
    assert token not in listed.stdout

    assert run(tmp_path, "tokens", "revoke", token_id).returncode == 0
    assert token_id not in run(tmp_path, "tokens", "list", "--user", "bob").stdout
    assert "no active token" in one_line_error(run(tmp_path, "tokens", "revoke", token_id))
    assert "no user" in one_line_error(run(tmp_path, "tokens", "list", "--user", "nobody"))


def test_users_add(tmp_path):
    added = run(tmp_path, "users", "add", "carol", "--password-stdin", stdin="pw-carol\n")
    assert added.returncode == 0, added.stderr
    assert "already exists" in one_line_error(run(tmp_path, "users", "add", "carol"))
    assert "user name" in one_line_error(run(tmp_path, "users", "add", "bad name!"))
    assert "no password" in one_line_error(
        run(tmp_path, "users", "add", "dave", "--password-stdin", stdin="")
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"LOOPBRIDGE_AGENT_IDLE_SECONDS": "soon"}, "agent_idle_seconds"),
        ({"LOOPBRIDGE_SANDBOX": "vm"}, "sandbox"),
        ({"LOOPBRIDGE_DEFAULT_PERMISSION_MODE": "yolo"}, "default_permission_mode"),
        ({"LOOPBRIDGE_CONFIG": "/nonexistent/loopbridge.toml"}, "LOOPBRIDGE_CONFIG"),
        ({"LOOPBRIDGE_DATABASE_URL": "postgresql+nodriver://x/y"}, "LOOPBRIDGE_DATABASE_URL"),
        ({"LOOPBRIDGE_CLI_PATH": "/nonexistent/claude"}, "agent CLI is missing"),
    ],
)
def test_bad_settings_stop_with_one_clear_line(tmp_path, env, expected):
    assert expected in one_line_error(run(tmp_path, "serve", "--port", "0", **env))


def test_bad_settings_file_is_one_line(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[profiles.x]\nsystem_prompt = 3\n")
    line = one_line_error(run(tmp_path, "serve", **{"LOOPBRIDGE_CONFIG": str(config)}))
    assert "profiles.x.system_prompt" in line
    config.write_text("this is not toml =")
    assert "settings file" in one_line_error(run(tmp_path, "serve", LOOPBRIDGE_CONFIG=str(config)))


def test_port_in_use_is_one_line(tmp_path):
    taken = listen("127.0.0.1", 0)
    try:
        port = str(taken.getsockname()[1])
        assert "in use" in one_line_error(run(tmp_path, "serve", "--port", port))
    finally:
        taken.close()


def test_no_command_prints_help():
    result = subprocess.run([*LOOPBRIDGE], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "serve" in result.stdout


async def test_demo_prints_a_curl_that_streams_a_turn(tmp_path):
    env = {**os.environ, "LOOPBRIDGE_HOME": str(tmp_path / "demo")}
    demo = await asyncio.create_subprocess_exec(
        *LOOPBRIDGE,
        "demo",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        printed = ""
        while "Ctrl-C" not in printed:
            line = await asyncio.wait_for(demo.stdout.readline(), 60)
            assert line, await demo.stderr.read()
            printed += line.decode()
        assert "STAND-IN MODEL" in printed
        base = re.search(r"(http://127\.0\.0\.1:\d+/api/v1)/loops ", printed).group(1)
        token = re.search(r"Bearer (la_[0-9a-f]{48})", printed).group(1)
        async with httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60
        ) as http:
            loop = (await http.post("/loops", json={"title": "demo"})).json()["id"]
            assert text_of(await turn(http, loop, "hello")) == "Echo #1: hello"
    finally:
        demo.terminate()
        await demo.wait()


async def test_serve_stops_cleanly_on_sigterm(tmp_path):
    env = {**os.environ, "LOOPBRIDGE_HOME": str(tmp_path), "LOOPBRIDGE_SANDBOX": "local"}
    server = await asyncio.create_subprocess_exec(
        *LOOPBRIDGE,
        "serve",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    line = await asyncio.wait_for(server.stdout.readline(), 60)
    assert b"serving the Loop API" in line, await server.stderr.read()
    server.terminate()
    assert await asyncio.wait_for(server.wait(), 30) == 0  # not killed by the signal
