"""The podman sandbox through the HTTP API: the real CLI and the stand-in model, in containers.

Every turn here goes through Loop API v1 to a server whose loops run in real Podman
containers; what happened inside is checked from the host (the loop's workdir) and
from Podman itself (containers listed by label with podman-py).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from podman import PodmanClient

from core.config import Settings
from core.engine import bundled_cli
from core.sandbox.image import podman_argv, podman_env, run
from core.sandbox.podman import AGENT_UID, CLI_DIR, LOOP_LABEL, SERVER_LABEL
from tests.conftest import Server, start_server, stop_server
from tests.podman import deep_home, skip_without_podman
from tests.sse import TERMINAL, Ev, events, names, text_of, turn

IMAGE = Settings().sandbox_image
CLI = bundled_cli()
CLI_INSIDE = f"{CLI_DIR}/{CLI.name}"


skip_without_podman()

BYPASS = {"permission_mode": "bypassPermissions"}
LOOPBRIDGE = [sys.executable, "-m", "bridge.cli"]
# Short enough to wait for, long enough for a cold turn (~1 s) to end before it.
IDLE_SECONDS = 2.0
WAIT_SECONDS = 15.0


# ---- servers --------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def box(standin, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Server]:
    """Loops in containers with a small memory cap; nothing goes idle during a test."""
    server = await start_server(
        deep_home(tmp_path_factory, "box"), sandbox="podman", sandbox_memory="768m"
    )
    yield server
    await stop_server(server)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def idle(standin, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Server]:
    """Agents stop after 0.5 s and sandboxes are reclaimed after IDLE_SECONDS."""
    server = await start_server(
        deep_home(tmp_path_factory, "idle"),
        sandbox="podman",
        agent_idle_seconds=0.5,
        sandbox_idle_seconds=IDLE_SECONDS,
    )
    yield server
    await stop_server(server)


async def new_loop(server: Server) -> str:
    r = await server.http.post("/loops", json={})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def result_oks(evs: list[Ev]) -> list[bool]:
    return [e.data["ok"] for e in evs if e.name == "tool_result"]


# ---- Podman, seen by label ----------------------------------------------------------------


def states(server: Server, loop_id: str | None = None) -> dict[str, str]:
    """Each of the server's containers (or one loop's): its loop id and state, via podman-py."""
    filters = [f"label={SERVER_LABEL}={server.engine.settings.data_dir}"]
    if loop_id is not None:
        filters.append(f"label={LOOP_LABEL}={loop_id}")
    with PodmanClient(base_url=server.engine.sandbox.url) as client:
        listed = client.containers.list(all=True, filters=filters)
    # A listed container's State is a word, not the inspected structure.
    return {c.labels[LOOP_LABEL]: c.attrs["State"] for c in listed}


async def podman_states(server: Server, loop_id: str | None = None) -> dict[str, str]:
    return await asyncio.to_thread(states, server, loop_id)


async def until_stopped(server: Server, loop_id: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while (await podman_states(server, loop_id)).get(loop_id) == "running":
        assert time.monotonic() < deadline, f"{loop_id}'s container still runs"
        await asyncio.sleep(0.2)


# ---- the module server ------------------------------------------------------------------


async def test_bash_writes_into_the_loop_workdir_seen_from_the_host(box: Server) -> None:
    loop = await new_loop(box)
    evs = await turn(box.http, loop, "[[bash: echo made > made.txt && id -u && pwd]]", **BYPASS)
    assert evs[0].name == "started" and evs[0].data["cold_start"] is True
    assert names(evs)[-1] == "done" and result_oks(evs) == [True]
    # The agent ran in /work inside the container, as its own uid when the server is root.
    uid = AGENT_UID if os.geteuid() == 0 else 0
    assert text_of(evs) == f"Tool ok: {uid}\n/work"
    assert (box.engine.sandbox.workdir(loop) / "made.txt").read_text() == "made\n"
    assert (await podman_states(box, loop)) == {loop: "running"}


async def test_a_file_seeded_from_the_host_is_read_by_the_agent(box: Server) -> None:
    loop = await new_loop(box)
    workdir = box.engine.sandbox.workdir(loop)
    workdir.mkdir(parents=True)  # before the loop's first turn, as a person would
    (workdir / "seed.txt").write_text("seeded from the host\n")
    evs = await turn(box.http, loop, "[[bash: cat seed.txt]]", **BYPASS)
    assert text_of(evs) == "Tool ok: seeded from the host"


async def test_a_background_process_outlives_its_turn(box: Server) -> None:
    loop = await new_loop(box)
    # It ends (~10 s) before the module does: an agent waiting for it stops slowly.
    ticker = "for i in $(seq 100); do echo tick >> ticks.txt; sleep 0.1; done"
    evs = await turn(box.http, loop, f"[[bashbg: {ticker}]]", **BYPASS)
    assert names(evs)[-1] == "done" and text_of(evs) == "Started in background."
    ticks = box.engine.sandbox.workdir(loop) / "ticks.txt"
    after_first = await ticking(ticks)
    # The next turn runs while the process does, and the process goes on after it.
    evs = await turn(box.http, loop, "[[bash: test -s ticks.txt && echo ticking]]", **BYPASS)
    assert names(evs)[-1] == "done" and text_of(evs) == "Tool ok: ticking"
    assert await ticking(ticks) > after_first


async def ticking(ticks: Path) -> int:
    """The number of ticks, once it is seen to grow."""
    deadline = time.monotonic() + WAIT_SECONDS
    before = count_lines(ticks)
    while (now := count_lines(ticks)) <= before:
        assert time.monotonic() < deadline, "the background process does not run"
        await asyncio.sleep(0.2)
    return now


def count_lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


async def test_two_loops_see_neither_files_nor_processes_of_each_other(box: Server) -> None:
    a, b = await new_loop(box), await new_loop(box)
    # `exec -a` names the process; `marke[r]` matches it but not the shell that searches.
    make = "echo secret > mine.txt; exec -a lb-loop-a-marker sleep 15"
    await turn(box.http, a, f"[[bashbg: {make}]]", **BYPASS)
    look = "pgrep -c -f lb-loop-a-marke[r]; true"
    assert text_of(await turn(box.http, a, f"[[bash: {look}]]", **BYPASS)) == "Tool ok: 1"

    a_workdir = box.engine.sandbox.workdir(a)
    probe = (
        f"{look}; find / -name mine.txt 2>/dev/null | wc -l; "
        f"test -e {a_workdir} && echo visible || echo invisible"
    )
    evs = await turn(box.http, b, f"[[bash: {probe}]]", **BYPASS)
    assert text_of(evs) == "Tool ok: 0\n0\ninvisible"
    assert (a_workdir / "mine.txt").exists()


async def test_a_process_over_the_memory_limit_fails_its_tool_not_the_server(
    box: Server,
) -> None:
    loop = await new_loop(box)
    # `tail` keeps its endless first line in memory until the kernel kills it (768 MB).
    evs = await turn(box.http, loop, "[[bash: tail /dev/zero]]", **BYPASS)
    assert result_oks(evs) == [False]
    assert names(evs)[-1] == "done"
    assert text_of(evs).startswith("Tool failed: Exit code 137")
    # The server, the loop and its agent all go on.
    assert (await box.http.get(f"/loops/{loop}")).status_code == 200
    evs = await turn(box.http, loop, "still there?")
    assert evs[0].data["cold_start"] is False and text_of(evs) == "Echo #2: still there?"


async def test_archiving_a_loop_removes_its_container(box: Server) -> None:
    loop = await new_loop(box)
    await turn(box.http, loop, "hello")
    assert (await podman_states(box, loop)) == {loop: "running"}
    assert (await box.http.delete(f"/loops/{loop}")).status_code == 204
    assert (await podman_states(box, loop)) == {}


# ---- idle reclaim ---------------------------------------------------------------------------


async def test_idle_reclaim_then_a_cold_start_keeps_the_conversation(idle: Server) -> None:
    loop = await new_loop(idle)
    first = await turn(idle.http, loop, "[[bash: echo kept > kept.txt]]", **BYPASS)
    assert names(first)[-1] == "done" and first[0].data["cold_start"] is True
    await until_stopped(idle, loop)
    assert (await podman_states(idle, loop)) != {}, "reclaimed means stopped, not removed"

    again = await turn(idle.http, loop, "again")
    assert again[0].data["cold_start"] is True
    assert text_of(again) == "Echo #2: again"  # the agent resumed its session
    assert (await podman_states(idle, loop)) == {loop: "running"}
    assert (idle.engine.sandbox.workdir(loop) / "kept.txt").read_text() == "kept\n"


async def test_a_pending_choice_is_evicted_with_its_sandbox(idle: Server) -> None:
    loop = await new_loop(idle)
    started = time.monotonic()
    seen: list[Ev] = []
    # Default permission mode: a Bash call that writes waits for a choice nobody makes.
    content = "[[bash: echo hi > asked.txt]]"
    async for ev in events(idle.http, "POST", f"/loops/{loop}/messages", json={"content": content}):
        seen.append(ev)
        if ev.name in TERMINAL:
            break
    assert "requires_choice" in names(seen)
    assert seen[-1].name == "error" and seen[-1].data["code"] == "sandbox_evicted"
    assert time.monotonic() - started >= IDLE_SECONDS
    await until_stopped(idle, loop)

    evs = await turn(idle.http, loop, "back")
    assert evs[0].data["cold_start"] is True and names(evs)[-1] == "done"


async def test_an_agent_stopped_while_its_background_command_runs_leaves_the_container(
    standin, tmp_path: Path
) -> None:
    # `podman exec` does not pass the SDK's SIGTERM on; a CLI left running would wake
    # up when its command ends and call the model with nobody listening.
    server = await start_server(tmp_path, sandbox="podman", agent_idle_seconds=0.5)
    try:
        loop = await new_loop(server)
        await turn(server.http, loop, "[[bashbg: sleep 120]]", **BYPASS)
        name = server.engine.sandbox.container_name(loop)
        deadline = time.monotonic() + WAIT_SECONDS
        # The SDK waits 5 s for the CLI to end after closing its input, then sends SIGTERM.
        while CLI_INSIDE in await asyncio.to_thread(commands_in, server, name):
            assert time.monotonic() < deadline, "the agent CLI still runs in the container"
            await asyncio.sleep(0.5)
        assert (await podman_states(server, loop)) == {loop: "running"}
    finally:
        await stop_server(server)


def commands_in(server: Server, name: str) -> str:
    """The command lines running in a container, via podman-py."""
    with PodmanClient(base_url=server.engine.sandbox.url) as client:
        top = client.containers.get(name).top(ps_args="args")
    return "\n".join(" ".join(process) for process in top["Processes"])


# ---- a server killed while its containers run ------------------------------------------------


@pytest.fixture
def home(tmp_path: Path) -> Path:
    # Resolved, as the server labels its containers; deep, for the socket paths.
    return tmp_path.resolve() / ("deep-" * 16) / "data"


async def test_a_killed_server_leaves_no_container_and_a_restart_removes_only_its_own(
    standin, home: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    env = {**os.environ, "LOOPBRIDGE_HOME": str(home), "LOOPBRIDGE_SANDBOX": "podman"}
    token = await cli_token(env)
    serve = await asyncio.create_subprocess_exec(
        *LOOPBRIDGE, "serve", "--port", "0", env=env, stdout=asyncio.subprocess.PIPE
    )
    try:
        url = await serving_url(serve)
        async with httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60
        ) as http:
            busy = await api_loop(http)
            await turn(http, busy, "[[bashbg: sleep 300]]", **BYPASS)
            quiet = await api_loop(http)
            await turn(http, quiet, "hello")
        assert await running_by_label(home) == {busy, quiet}
    finally:
        serve.send_signal(signal.SIGKILL)
        await serve.wait()
    # Its watchdog removes its containers, agents and all, even the busy one's.
    deadline = time.monotonic() + WAIT_SECONDS
    while await labelled(home):
        assert time.monotonic() < deadline, "containers outlived their server"
        await asyncio.sleep(0.5)

    # What a server whose watchdog died too would leave; and another server's container.
    other = deep_home(tmp_path_factory, "other")
    other.mkdir(parents=True)
    for data_dir, loop_id in ((home, "loop_left"), (other, "loop_other")):
        await run(
            *podman_argv(None),
            "run",
            "-d",
            "--label",
            f"{SERVER_LABEL}={data_dir}",
            "--label",
            f"{LOOP_LABEL}={loop_id}",
            IMAGE,
            "sleep",
            "300",
            env=podman_env(),
        )
    server = await start_server(home, sandbox="podman")
    try:
        assert await labelled(home) == set()
        assert await running_by_label(other) == {"loop_other"}
        # The killed server's podman service ended with it.
        assert podman_services(server.engine.sandbox.service_socket) == {
            server.engine.sandbox.service.pid
        }
        http = server.client(token)
        evs = await turn(http, quiet, "after the crash")
        assert evs[0].data["cold_start"] is True
        assert text_of(evs) == "Echo #2: after the crash"
        await http.aclose()
    finally:
        await stop_server(server)
        await run(
            *podman_argv(None), "rm", "-f", "-t", "0", *await labelled(other), env=podman_env()
        )
    # A server that stops leaves nothing either.
    assert await labelled(home) == set()


async def cli_token(env: dict[str, str]) -> str:
    out = await run(*LOOPBRIDGE, "tokens", "create", "--user", "alice", env=env)
    return out.strip().splitlines()[-1]


async def serving_url(serve: asyncio.subprocess.Process) -> str:
    assert serve.stdout is not None
    line = await asyncio.wait_for(serve.stdout.readline(), 60)
    found = re.search(r"(http://\S+/api/v1)", line.decode())
    assert found, f"the server did not start: {line!r}"
    return found.group(1)


async def api_loop(http: httpx.AsyncClient) -> str:
    r = await http.post("/loops", json={})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def running_by_label(home: Path) -> set[str]:
    """The loop ids of running containers labelled with this data dir (podman's CLI:
    no API service runs while the server is down)."""
    out = await run(
        *podman_argv(None),
        "ps",
        "--filter",
        f"label={SERVER_LABEL}={home}",
        "--format",
        f'{{{{index .Labels "{LOOP_LABEL}"}}}}',
        env=podman_env(),
    )
    return set(out.split())


async def labelled(home: Path) -> set[str]:
    """Ids of all containers labelled with this data dir, running or not."""
    out = await run(
        *podman_argv(None),
        "ps",
        "-aq",
        "--filter",
        f"label={SERVER_LABEL}={home}",
        env=podman_env(),
    )
    return set(out.split())


def podman_services(socket: Path) -> set[int]:
    """Pids of `podman system service` processes on this socket."""
    pids = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"service" in argv and any(str(socket).encode() in arg for arg in argv):
            pids.add(int(proc.name))
    return pids
