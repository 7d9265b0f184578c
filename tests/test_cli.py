"""The `loopbridge` command line, run as a person would run it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from bridge.cli.doctor import check_database
from bridge.server.net import listen
from core.config import load_settings
from tests.sse import text_of, turn

LOOPBRIDGE = [sys.executable, "-m", "bridge.cli"]
ROOT = Path(__file__).resolve().parent.parent


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
        # The variable a person set, not the field behind it.
        ({"LOOPBRIDGE_AGENT_IDLE_SECONDS": "soon"}, "LOOPBRIDGE_AGENT_IDLE_SECONDS"),
        ({"LOOPBRIDGE_SANDBOX": "vm"}, "bad setting LOOPBRIDGE_SANDBOX:"),
        ({"LOOPBRIDGE_DEFAULT_PERMISSION_MODE": "yolo"}, "LOOPBRIDGE_DEFAULT_PERMISSION_MODE"),
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
    config.write_text('sandbox = "vm"\n')  # a key of the file, named with the file
    assert f"bad setting sandbox in {config}:" in one_line_error(
        run(tmp_path, "serve", LOOPBRIDGE_CONFIG=str(config))
    )
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
    async with running_demo(env) as printed:
        assert "STAND-IN MODEL" in printed
        base = re.search(r"(http://127\.0\.0\.1:\d+/api/v1)/loops ", printed).group(1)
        token = re.search(r"Bearer (la_[0-9a-f]{48})", printed).group(1)
        async with httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60
        ) as http:
            loop = (await http.post("/loops", json={"title": "demo"})).json()["id"]
            assert text_of(await turn(http, loop, "hello")) == "Echo #1: hello"


@contextlib.asynccontextmanager
async def running_demo(env: dict[str, str]) -> AsyncIterator[str]:
    """`loopbridge demo`, up to what it prints before waiting for Ctrl-C; stopped at the end."""
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
        yield printed
    finally:
        demo.terminate()
        await asyncio.wait_for(demo.wait(), 60)


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


# ---- the first hour: every mistake is one line that says what to fix ------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("nonsense", "is not a database URL"),
        ("sqlite:///x.db", "write sqlite+aiosqlite:///x.db"),
        ("postgresql://u:secret@db/lb", "write postgresql+asyncpg://u:***@db/lb"),
        ("mysql://db/lb", "MySQL and MariaDB are not supported"),
        ("sqlite+aiosqlite:////nonexistent/dir/lb.db", "/nonexistent/dir does not exist"),
    ],
)
def test_database_urls_that_cannot_work_are_one_line(tmp_path, url, expected):
    commands = [["tokens", "create", "--user", "x"]]
    if url.startswith("postgresql"):  # serve checks the same way (once is enough here)
        commands.append(["serve", "--port", "0"])
    for command in commands:
        line = one_line_error(run(tmp_path, *command, LOOPBRIDGE_DATABASE_URL=url))
        assert expected in line and "secret" not in line
        if url.startswith("postgresql"):
            assert "pip install 'loopbridge[postgres]'" in line
    # The doctor's line for it (the whole doctor runs in test_doctor_checks_the_model_key).
    check = asyncio.run(check_database(load_settings(home=tmp_path, database_url=url)))
    assert not check.ok and expected in check.line()


def test_a_data_directory_that_cannot_be_one_is_one_line(tmp_path):
    home = tmp_path / "a-file"
    home.write_text("")
    for command in (["serve", "--port", "0"], ["tokens", "create", "--user", "x"], ["demo"]):
        line = one_line_error(run(home, *command))
        assert f"LOOPBRIDGE_HOME={home} is a file" in line
    doctor = run(home, "doctor", "--offline", LOOPBRIDGE_SANDBOX="local")
    assert doctor.returncode == 1 and "Traceback" not in doctor.stderr
    assert f"FAIL home     LOOPBRIDGE_HOME={home} is a file" in doctor.stdout


def test_a_port_out_of_range_is_one_line(tmp_path):
    assert "--port 99999 is not a TCP port" in one_line_error(
        run(tmp_path, "serve", "--port", "99999")
    )


def test_help_shows_defaults_and_the_environment_each_command_reads(capsys):
    from bridge.cli import main

    def helped(*args: str) -> str:
        with pytest.raises(SystemExit) as done:
            main([*args, "--help"])
        assert done.value.code == 0
        return capsys.readouterr().out

    serve = helped("serve")
    assert "(default: 8642)" in serve and "(default: 127.0.0.1)" in serve
    assert "LOOPBRIDGE_HOME (default: ~/.loopbridge)" in serve
    assert "LOOPBRIDGE_SANDBOX (default: auto)" in serve and "ANTHROPIC_API_KEY" in serve
    assert "LOOPBRIDGE_API_TOKEN" in helped("slack")
    assert "LOOPBRIDGE_DATABASE_URL" in helped("tokens", "create")
    assert "--offline" in helped("doctor")
    assert "--keep" in helped("demo")


# ---- doctor and the model key ---------------------------------------------------------------


class ModelApi:
    """A model endpoint that takes one key (`GET /v1/models` answers 200 or 401)."""

    def __init__(self, key: str) -> None:
        import http.server
        import threading

        wanted = key

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                ok = self.headers.get("x-api-key") == wanted or self.path == "/"
                body = b'{"data": []}' if ok else b'{"type": "error"}'
                self.send_response(200 if ok else 401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_doctor_checks_the_model_key(tmp_path):
    from bridge.cli.doctor import check_key

    api = ModelApi("sk-good")
    try:
        good = await check_key(api.url, "sk-good")
        assert good.ok and "accepted" in good.line()
        bad = await check_key(api.url, "sk-bad")
        assert not bad.ok and "refused ANTHROPIC_API_KEY (HTTP 401)" in bad.line()
        # The whole doctor, as a person runs it: the key's line among the others.
        result = await asyncio.to_thread(
            run,
            tmp_path,
            "doctor",
            LOOPBRIDGE_SANDBOX="local",
            ANTHROPIC_BASE_URL=api.url,
            ANTHROPIC_API_KEY="",
        )
    finally:
        api.close()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "FAIL key      ANTHROPIC_API_KEY is not set" in result.stdout
    offline = await check_key("http://127.0.0.1:9", "sk-x", offline=True)
    assert offline.ok and "not tried: --offline" in offline.line()
    unreachable = await check_key("http://127.0.0.1:9", "sk-x")
    assert unreachable.ok and "unreachable" in unreachable.line()


# ---- the adapters' platforms at start ---------------------------------------------------------


async def serving(home, **env: str) -> tuple[asyncio.subprocess.Process, str]:
    """`loopbridge serve` started; its process and API base URL, once it serves."""
    server = await asyncio.create_subprocess_exec(
        *LOOPBRIDGE,
        "serve",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LOOPBRIDGE_HOME": str(home), "LOOPBRIDGE_SANDBOX": "local", **env},
    )
    line = await asyncio.wait_for(server.stdout.readline(), 60)
    if b"serving the Loop API" not in line:
        server.kill()
        raise AssertionError((line + await server.stderr.read()).decode())
    return server, re.search(r"http://\S+/api/v1", line.decode()).group(0)


async def stopped(server: asyncio.subprocess.Process) -> str:
    server.terminate()
    _, err = await asyncio.wait_for(server.communicate(), 30)
    return err.decode()


@pytest.mark.parametrize("reach", ["refused", "unreachable"])
async def test_a_platform_that_will_not_have_the_adapter_leaves_the_api_serving(tmp_path, reach):
    from tests.fakes.discord import FakeDiscord
    from tests.fakes.slack import FakeSlack

    slack, discord = FakeSlack(), FakeDiscord()
    await slack.start()
    await discord.start()
    closed = listen("127.0.0.1", 0)  # a port where nothing answers
    nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    env = {
        "LOOPBRIDGE_SLACK_BOT_TOKEN": "xoxb-revoked",
        "LOOPBRIDGE_SLACK_APP_TOKEN": "xapp-x",
        "LOOPBRIDGE_SLACK_API_URL": slack.api_url,
        "LOOPBRIDGE_DISCORD_TOKEN": "revoked",
        "LOOPBRIDGE_DISCORD_API_URL": discord.api_url,
        "LOOPBRIDGE_DISCORD_GATEWAY_URL": discord.gateway_url,
    }
    if reach == "unreachable":
        env |= {
            "LOOPBRIDGE_SLACK_API_URL": nowhere + "/api/",
            "LOOPBRIDGE_DISCORD_API_URL": nowhere + "/api/v10",
        }
    try:
        server, base = await serving(tmp_path, **env)
        async with httpx.AsyncClient(timeout=30) as http:
            answer = await http.get(f"{base}/loops")
        assert answer.status_code == 401 and answer.json()["error"]["code"]  # the API serves
        err = await stopped(server)
    finally:
        await slack.stop()
        await discord.stop()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    slack_lines = [line for line in lines if "slack adapter" in line]
    discord_lines = [line for line in lines if "discord adapter" in line]
    assert slack_lines and discord_lines, err
    assert all(line.startswith("loopbridge: ") for line in slack_lines + discord_lines)
    if reach == "refused":
        assert slack_lines == [
            "loopbridge: the slack adapter: Slack refused LOOPBRIDGE_SLACK_BOT_TOKEN "
            "(invalid_auth); it stays off (fix the setting and restart)"
        ]
        assert len(discord_lines) == 1 and "Discord refused LOOPBRIDGE_DISCORD_TOKEN" in err
    else:
        assert "cannot reach Slack at" in slack_lines[0] and "trying again" in slack_lines[0]
        assert "cannot reach Discord at" in discord_lines[0]


async def test_the_adapters_alone_say_a_refused_token_in_one_line(tmp_path):
    from tests.fakes.slack import FakeSlack

    slack = FakeSlack()
    await slack.start()
    try:
        result = await asyncio.to_thread(
            run,
            tmp_path,
            "slack",
            LOOPBRIDGE_API_URL="http://127.0.0.1:9",
            LOOPBRIDGE_API_TOKEN="la_x",
            LOOPBRIDGE_SLACK_BOT_TOKEN="xoxb-revoked",
            LOOPBRIDGE_SLACK_APP_TOKEN="xapp-x",
            LOOPBRIDGE_SLACK_API_URL=slack.api_url,
        )
    finally:
        await slack.stop()
    assert "Slack refused LOOPBRIDGE_SLACK_BOT_TOKEN (invalid_auth)" in one_line_error(result)


# ---- from the demo to the README's examples ---------------------------------------------------


def readme_block(containing: str) -> str:
    """The README's `sh` block that holds `containing`, as a person would copy it."""
    text = (ROOT / "README.md").read_text()
    for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL):
        if containing in block:
            return block
    raise AssertionError(f"no sh block with {containing!r} in the README")


def streamed_text(sse: str) -> str:
    """The answer's text out of a raw SSE stream, as curl printed it."""
    import json

    texts = []
    for frame in sse.replace("\r\n", "\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in frame.splitlines() if ": " in line)
        if fields.get("event") == "assistant_delta":
            texts.append(json.loads(fields["data"])["text"])
    return "".join(texts)


async def containers_of(home: Path) -> list[str]:
    """The ids of the containers a server with this data directory made (podman's label)."""
    if shutil.which("podman") is None:
        return []
    podman = await asyncio.create_subprocess_exec(
        "podman",
        "ps",
        "--all",
        "--quiet",
        "--filter",
        f"label=loopbridge.server={home}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(podman.communicate(), 60)
    return out.decode().split()


async def test_the_readmes_example_works_against_the_demo_which_leaves_nothing_behind():
    if not (ROOT / ".venv" / "bin" / "loopbridge").is_file():
        pytest.skip("the README's commands use .venv/bin/loopbridge, and there is no .venv here")
    venv_bin = str(ROOT / ".venv" / "bin")
    # A person's shell: no LOOPBRIDGE_HOME, the venv not activated.
    env = {key: value for key, value in os.environ.items() if key != "LOOPBRIDGE_HOME"}
    env["PATH"] = os.pathsep.join(
        part for part in env.get("PATH", "").split(os.pathsep) if part.rstrip("/") != venv_bin
    )
    async with running_demo(env) as printed:
        export = re.search(r"^  (export LOOPBRIDGE_HOME=.+)$", printed, re.MULTILINE).group(1)
        home = Path(export.split("=", 1)[1])
        port = re.search(r"http://127\.0\.0\.1:(\d+)/api/v1", printed).group(1)
        # The block as written; only the port is the demo's (8642 may be taken here).
        block = readme_block("tokens create --user alice").replace(
            "localhost:8642", f"localhost:{port}"
        )
        shell = await asyncio.create_subprocess_exec(
            "bash",
            "-euo",
            "pipefail",
            "-c",
            f"{export}\n{block}",
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(shell.communicate(), 120)
        assert shell.returncode == 0, err.decode()
        assert streamed_text(out.decode()) == "Echo #1: hello"
        assert await asyncio.to_thread(home.is_dir)
        print("the demo's containers:", await containers_of(home))  # none without podman
    assert not await asyncio.to_thread(home.exists), "the demo's data directory is gone"
    assert await containers_of(home) == [], "the demo's containers are removed when it ends"
