"""What an agent can reach, tried as an attacker would, through the HTTP API.

A loop's agent in `bypassPermissions` runs Bash commands (the stand-in's `[[bash: …]]`)
that try to read the server's secrets: a canary in the server's environment (through
`/proc/1/environ`, `/proc/<server pid>/environ`, `env`), the database, another loop's
working directory and the settings file (a vault the loop did not choose). None of
the canaries may show up in what the model was sent (the whole tool output), in the
turn's events or in the agent's own transcript. A control value in the loop's own
working directory must show up, so that a probe that read nothing cannot pass.

In the default sandbox (what `auto` picks here: podman when it works, else
bubblewrap) and in bubblewrap by name; then `auto` with neither, and `local` as root.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from core.sandbox.users import lookup
from tests.conftest import Server, start_server, stop_server
from tests.sse import names, text_of, turn

BYPASS = {"permission_mode": "bypassPermissions"}
NO_BWRAP = "bubblewrap is not installed here (apt-get install bubblewrap)"


def canary(what: str) -> str:
    return f"lbcanary{what}{secrets.token_hex(8)}"


ENV_CANARY = canary("env")
VAULT_CANARY = canary("vault")
OTHER_LOOP_CANARY = canary("loop")
DB_CANARY = canary("db")
SECRETS = [ENV_CANARY, VAULT_CANARY, OTHER_LOOP_CANARY, DB_CANARY]
CANARY_PATTERN = "lbcanary[a-z0-9]*"


@pytest.fixture(scope="module")
def server_secrets(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Path]:
    """The server's environment holds a canary, its settings file a vault secret."""
    config = tmp_path_factory.mktemp("settings") / "loopbridge.toml"
    config.write_text(f'[vaults.team]\nenv = {{ TEAM_TOKEN = "{VAULT_CANARY}" }}\n')
    saved = {key: os.environ.get(key) for key in ("LOOPBRIDGE_TEST_CANARY", "LOOPBRIDGE_CONFIG")}
    os.environ["LOOPBRIDGE_TEST_CANARY"] = ENV_CANARY
    os.environ["LOOPBRIDGE_CONFIG"] = str(config)
    yield config
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest_asyncio.fixture(loop_scope="session", scope="module", params=["auto", "bubblewrap"])
async def box(
    request: pytest.FixtureRequest,
    standin,
    server_secrets: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Server]:
    if request.param == "bubblewrap" and shutil.which("bwrap") is None:
        pytest.skip(NO_BWRAP)
    server = await start_server(tmp_path_factory.mktemp("box"), sandbox=request.param)
    server.standin = standin
    if server.engine.sandbox.name == "none":
        # No agent runs at all here: the refusal has its own test below.
        await stop_server(server)
        pytest.skip(f"auto refuses agents here: {server.engine.sandbox.reason}")
    yield server
    await stop_server(server)


async def new_loop(server: Server, **body: object) -> str:
    r = await server.http.post("/loops", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def probe_command(server: Server, other_loop: str, config: Path) -> str:
    """One Bash command that tries every way to the secrets, printing any canary it finds."""
    data_dir = server.engine.settings.data_dir
    db = data_dir / "loopbridge.db"
    other = server.engine.sandbox.workdir(other_loop) / "secret.txt"
    files = [
        "/proc/1/environ",
        f"/proc/{os.getpid()}/environ",
        db,
        f"{db}-wal",
        config,
        other,
        "own.txt",
    ]
    grep = f"grep -a -o '{CANARY_PATTERN}'"
    tries = [f"tr '\\0' '\\n' < {path} 2>/dev/null | {grep}" for path in files]
    tries += [
        f"env | {grep}",
        f"cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | {grep}",
        f"grep -r -a -o -h '{CANARY_PATTERN}' {data_dir} /tmp /run /etc 2>/dev/null",
        f"ls {data_dir} 2>&1 | head -3",
    ]
    return "; ".join(tries) + "; echo probe-done"


def transcripts(server: Server, loop_id: str) -> str:
    home = server.engine.sandbox.home(loop_id)
    return "".join(p.read_text(errors="replace") for p in home.rglob("*.jsonl"))


async def test_the_default_sandbox_is_a_real_one(box: Server) -> None:
    assert box.engine.sandbox.name in {"podman", "bubblewrap"}


async def test_an_agent_cannot_read_the_servers_secrets(box: Server, server_secrets: Path) -> None:
    # Another user's loop with a file in its working directory, and a canary in the database.
    other = await new_loop(box)
    other_workdir = box.engine.sandbox.workdir(other)
    other_workdir.mkdir(parents=True)
    (other_workdir / "secret.txt").write_text(OTHER_LOOP_CANARY + "\n")
    await new_loop(box, metadata={"note": DB_CANARY})

    loop = await new_loop(box)
    own = canary("own")
    workdir = box.engine.sandbox.workdir(loop)
    workdir.mkdir(parents=True)
    (workdir / "own.txt").write_text(own + "\n")
    before = len(box.standin.requests)

    evs = await turn(
        box.http, loop, f"[[bash: {probe_command(box, other, server_secrets)}]]", **BYPASS
    )
    assert names(evs)[-1] == "done", evs[-1].data

    sent = json.dumps(box.standin.requests[before:])
    seen = json.dumps([e.data for e in evs])
    transcript = transcripts(box, loop)
    # The probe ran, and would have shown what it could read.
    assert "probe-done" in sent and own in sent and own in transcript
    for value in SECRETS:
        for where, text in (
            ("the model's input", sent),
            ("events", seen),
            ("transcript", transcript),
        ):
            assert value not in text, f"{value[:14]}… reached {where}"


async def test_no_other_process_is_visible(box: Server) -> None:
    loop = await new_loop(box)
    look = f"ls /proc | grep -c '^[0-9]'; test -e /proc/{os.getpid()}/cmdline && echo server; true"
    evs = await turn(box.http, loop, f"[[bash: {look}]]", **BYPASS)
    answer = text_of(evs)
    assert answer.startswith("Tool ok: ") and "server" not in answer
    # The sandbox's own processes only: its init, the CLI, the shell, ls, grep (and a relay).
    assert int(answer.removeprefix("Tool ok: ").split()[0]) <= 10


async def test_the_agent_cannot_reach_the_servers_api(box: Server) -> None:
    """In the `model` network the agent reaches the model API, and nothing else here."""
    loop = await new_loop(box)
    port = box.url.rsplit(":", 1)[1]
    reach = f"(exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo reached || echo refused"
    evs = await turn(box.http, loop, f"[[bash: {reach}]]", **BYPASS)
    assert text_of(evs) == "Tool ok: refused"


# ---- no sandbox, and local as root -----------------------------------------------------------


async def test_auto_without_podman_or_bubblewrap_refuses_agents_with_one_line(
    standin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Neither podman nor bwrap on PATH; git stays for repos.
    bare = tmp_path / "bin"
    bare.mkdir()
    monkeypatch.setenv("PATH", str(bare))
    server = await start_server(tmp_path / "home", sandbox="auto")
    try:
        assert server.engine.sandbox.name == "none"
        loop = await new_loop(server)
        evs = await turn(server.http, loop, "hello")
        assert names(evs)[-1] == "error"
        error = evs[-1].data
        assert error["code"] == "sandbox_spawn_failed"
        message = error["message"]
        assert message.startswith("no sandbox can run agents here (podman: podman is not")
        assert "bubblewrap: bwrap is not installed" in message
        assert message.endswith(
            "install podman or bubblewrap, or set LOOPBRIDGE_SANDBOX=local on a single-user machine"
        )
        assert "\n" not in message
    finally:
        await stop_server(server)


@pytest.mark.skipif(os.geteuid() != 0, reason="the server is not root: agents run as its user")
async def test_local_as_root_runs_the_agent_as_its_own_user(standin, tmp_path: Path) -> None:
    server = await start_server(tmp_path, sandbox="local")
    try:
        await local_agent_is_another_user(server)
    finally:
        await stop_server(server)


async def local_agent_is_another_user(server: Server) -> None:
    loop = await new_loop(server)
    data_dir = server.engine.settings.data_dir
    db = data_dir / "loopbridge.db"
    look = f"id -u; cat {db} >/dev/null 2>&1 && echo db || echo no-db; ls {data_dir}/loops | wc -l"
    evs = await turn(server.http, loop, f"[[bash: {look}]]", **BYPASS)
    agent = lookup()
    assert agent is not None and agent.uid != 0
    # Its uid, no database, and only its own loop's directory in its view of the data dir.
    assert text_of(evs) == f"Tool ok: {agent.uid}\nno-db\n1"
    assert (server.engine.sandbox.workdir(loop)).stat().st_uid == agent.uid
