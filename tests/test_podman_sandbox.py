"""The podman backend with real podman, the real bundled CLI and the stand-in model."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ClaudeSDKClient,
    ProcessError,
    ResultMessage,
    TextBlock,
)

from bridge.standin import StandinModel
from core.config import Settings
from core.engine import bundled_cli
from core.sandbox.base import AgentHost, SandboxSpec
from core.sandbox.image import RECIPE, RECIPE_LABEL, load_recipe, podman_argv, podman_env, run
from core.sandbox.podman import AGENT_UID, LOOP_LABEL, SERVER_LABEL, PodmanSandbox
from tests.podman import deep_home, skip_without_podman

SETTINGS = Settings(
    sandbox="podman",
    sandbox_network="model",
    sandbox_pids=64,
    sandbox_memory="1g",
    sandbox_cpus=1.0,
)
CLI = bundled_cli()


skip_without_podman()

TURN_TIMEOUT = 30
# cgroup v1 has a hierarchy per controller; v2 one for all.
PIDS_CGROUPS = next(p for p in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")) if p.is_dir())


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def model() -> AsyncIterator[StandinModel]:
    standin = StandinModel()
    await standin.start()
    yield standin
    await standin.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def sandbox(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PodmanSandbox]:
    home = deep_home(tmp_path_factory, "podman")
    home.mkdir(parents=True)
    box = PodmanSandbox(home, CLI, SETTINGS.model_copy(update={"home": home}))
    await box.start()
    yield box
    for loop_id in ("loop_a", "loop_b"):
        await box.remove(loop_id)
    await box.close()


def spec(model: StandinModel, loop_id: str) -> SandboxSpec:
    return SandboxSpec(
        loop_id,
        {
            "ANTHROPIC_BASE_URL": model.url,
            "ANTHROPIC_API_KEY": "sk-standin",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "CLAUDE_CODE_MAX_RETRIES": "0",
        },
    )


async def turn(host: AgentHost, prompt: str) -> str:
    """One turn of a fresh agent in the sandbox; the text of its last answer."""
    options = ClaudeAgentOptions(
        cli_path=host.cli_path, cwd=host.cwd, env=host.env, permission_mode="bypassPermissions"
    )
    texts: list[str] = []
    async with asyncio.timeout(TURN_TIMEOUT), ClaudeSDKClient(options) as client:
        await client.query(prompt)
        async for message in client.receive_response():
            if isinstance(message, AssistantMessage):
                texts += [b.text for b in message.content if isinstance(b, TextBlock)]
            if isinstance(message, ResultMessage):
                assert not message.is_error, message.result
    return texts[-1]


async def test_bash_writes_into_the_host_workdir(
    sandbox: PodmanSandbox, model: StandinModel
) -> None:
    host, cold = await sandbox.acquire(spec(model, "loop_a"))
    assert cold
    text = await turn(host, "[[bash: echo made > made.txt && id -u && pwd]]")
    # Its own uid when the server is root; rootless, container root is the server's user.
    assert text == f"Tool ok: {AGENT_UID if os.geteuid() == 0 else 0}\n/work"
    assert (host.workdir / "made.txt").read_text() == "made\n"
    _, cold = await sandbox.acquire(spec(model, "loop_a"))
    assert not cold


async def test_loops_cannot_see_each_other(sandbox: PodmanSandbox, model: StandinModel) -> None:
    host_b, _ = await sandbox.acquire(spec(model, "loop_b"))
    command = f"find / -name made.txt 2>/dev/null | wc -l; ls {sandbox.data_dir} 2>&1 | wc -l"
    assert await turn(host_b, f"[[bash: echo b > b.txt; {command}]]") == "Tool ok: 0\n1"
    assert not (sandbox.workdir("loop_a") / "b.txt").exists()


async def test_root_is_read_only_without_capabilities(
    sandbox: PodmanSandbox, model: StandinModel
) -> None:
    host, _ = await sandbox.acquire(spec(model, "loop_a"))
    command = "touch /usr/x 2>&1 | grep -c Read-only; grep CapEff /proc/self/status"
    assert await turn(host, f"[[bash: {command}]]") == "Tool ok: 1\nCapEff:\t0000000000000000"


async def test_network_reaches_the_model_only(sandbox: PodmanSandbox, model: StandinModel) -> None:
    host, _ = await sandbox.acquire(spec(model, "loop_a"))
    # Something else listening on the host's loopback, which the agent must not reach.
    with socket.create_server(("127.0.0.1", 0)) as other:
        port = other.getsockname()[1]
        probes = [f"/dev/tcp/127.0.0.1/{port}", "/dev/tcp/1.1.1.1/80"]
        command = "; ".join(f"(exec 3<>{probe}) 2>/dev/null || echo refused" for probe in probes)
        assert await turn(host, f"[[bash: {command}]]") == "Tool ok: refused\nrefused"


async def test_pids_limit_stops_a_fork_bomb(sandbox: PodmanSandbox, model: StandinModel) -> None:
    host, _ = await sandbox.acquire(spec(model, "loop_a"))
    bomb = "sh -c 'f(){ f|f& }; f' 2>/dev/null; sleep 2; echo survived"
    try:
        reply = await turn(host, f"[[bash: {bomb}]]")
    except ProcessError:
        # The limit is the container's, the agent's own threads included: starved of
        # one, the CLI may abort. The host and the sandbox must survive either way.
        reply = "Tool ok: survived"
    # bash may also say that a fork of its own had to be retried
    assert reply.startswith("Tool ok: ") and reply.endswith("survived"), reply
    container = await sandbox.find("loop_a")
    assert container is not None
    cgroup = PIDS_CGROUPS / container.attrs["State"]["CgroupPath"].lstrip("/")
    events = dict(line.split() for line in (cgroup / "pids.events").read_text().splitlines())
    assert int(events["max"]) > 0, "the bomb never reached the pids limit"
    # The bomb's last forks die out on their own once every fork fails.
    for _ in range(100):
        if int((cgroup / "pids.current").read_text()) < 64:
            break
        await asyncio.sleep(0.1)
    assert int((cgroup / "pids.current").read_text()) < 64
    host, _ = await sandbox.acquire(spec(model, "loop_a"))
    assert await turn(host, "[[bash: echo alive]]") == "Tool ok: alive"


async def test_release_then_acquire_is_cold_and_keeps_files(
    sandbox: PodmanSandbox, model: StandinModel
) -> None:
    await sandbox.release("loop_a")
    container = await sandbox.find("loop_a")
    assert container is not None and container.status != "running"
    host, cold = await sandbox.acquire(spec(model, "loop_a"))
    assert cold
    assert await turn(host, "[[bash: cat made.txt]]") == "Tool ok: made"


async def test_a_restart_removes_what_an_earlier_run_left(
    sandbox: PodmanSandbox, model: StandinModel
) -> None:
    # A second server on the same data dir (same podman service) removes the containers
    # an earlier run left; the loops' files stay, and their loops start again.
    again = PodmanSandbox(
        sandbox.data_dir, CLI, sandbox.settings.model_copy(update={"podman_url": sandbox.url})
    )
    await again.start()
    filters = [f"label={SERVER_LABEL}={sandbox.data_dir}", f"label={LOOP_LABEL}"]
    assert await again.call(again.api.containers.list, all=True, filters=filters) == []
    assert (sandbox.workdir("loop_a") / "made.txt").exists()
    host, cold = await again.acquire(spec(model, "loop_a"))
    assert cold
    assert await turn(host, "[[bash: cat made.txt]]") == "Tool ok: made"
    await again.remove("loop_a")
    await again.close()


# ---- the command line ----------------------------------------------------------------------


async def loopbridge(home: Path, *args: str, **env: str) -> tuple[int, str]:
    """Run `loopbridge ARGS` (without blocking the stand-in's event loop): exit code, stdout."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "LOOPBRIDGE_HOME": str(home), **env},
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def test_doctor_passes_here_and_names_the_fix_for_what_fails(
    sandbox: PodmanSandbox, model: StandinModel, tmp_path: Path
) -> None:
    code, out = await loopbridge(
        tmp_path, "doctor", ANTHROPIC_BASE_URL=model.url, ANTHROPIC_API_KEY="sk-standin"
    )
    assert code == 0, out
    checks = ["home", "sandbox", "podman", "image", "cli", "model", "key", "database"]
    assert [line.split()[:2] for line in out.splitlines()] == [["ok", name] for name in checks]

    code, out = await loopbridge(
        tmp_path, "doctor", ANTHROPIC_BASE_URL="http://127.0.0.1:9", ANTHROPIC_API_KEY="sk-x"
    )
    assert code == 1
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1 and failed[0].split()[1] == "model"
    assert "fix: " in failed[0]


async def test_sandbox_build_prints_its_progress(tmp_path: Path) -> None:
    tag = "localhost/loopbridge-sandbox-test:latest"
    code, out = await loopbridge(tmp_path, "sandbox", "build", LOOPBRIDGE_SANDBOX_IMAGE=tag)
    try:
        assert code == 0, out
        lines = out.splitlines()
        assert lines[0] == f"building {tag} from {RECIPE}"
        assert lines[1].startswith("resolved ") and lines[-1].startswith(f"imported {tag} in ")
        label = f'{{{{index .Labels "{RECIPE_LABEL}"}}}}'
        built_from = await run(
            *podman_argv(None), "image", "inspect", "--format", label, tag, env=podman_env()
        )
        assert built_from.strip() == load_recipe(RECIPE).digest
    finally:
        await run(*podman_argv(None), "rmi", "-f", tag, env=podman_env())
