"""Measure the podman sandbox: image build, container start, and a turn's overhead.

    python -m bench.bench_sandbox [--turns 100] [--starts 10]

Builds the image under its own tag into a fresh data dir (so "from nothing"
includes downloading the .debs), then compares a trivial echo turn of the real
bundled CLI against the stand-in model, run through `podman exec` and as a local
process. Needs root and podman, like the sandbox itself.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import claude_agent_sdk
from claude_agent_sdk import ClaudeAgentOptions, ClaudeSDKClient, ResultMessage

from bridge.standin import StandinModel
from core.config import Settings
from core.sandbox.base import AgentHost, Sandbox, SandboxSpec
from core.sandbox.image import build_image, podman_argv, podman_env, run
from core.sandbox.local import LocalSandbox
from core.sandbox.podman import PodmanSandbox

CLI = Path(claude_agent_sdk.__file__).parent / "_bundled" / "claude"
TAG = "localhost/loopbridge-sandbox-bench:latest"


def agent_env(url: str) -> dict[str, str]:
    return {
        "ANTHROPIC_BASE_URL": url,
        "ANTHROPIC_API_KEY": "sk-standin",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CLAUDE_CODE_MAX_RETRIES": "0",
        "IS_SANDBOX": "1",
    }


async def timed(step: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await step()
    return time.perf_counter() - started


async def turn(client: ClaudeSDKClient, prompt: str) -> None:
    await client.query(prompt)
    async for message in client.receive_response():
        if isinstance(message, ResultMessage) and message.is_error:
            raise RuntimeError(f"turn failed: {message.result}")


async def turns(host: AgentHost, count: int) -> tuple[float, list[float]]:
    """Connect time and the time of each of `count` echo turns of one agent."""
    options = ClaudeAgentOptions(
        cli_path=host.cli_path, cwd=host.cwd, env=host.env, permission_mode="bypassPermissions"
    )
    client = ClaudeSDKClient(options)
    connect = await timed(client.connect)
    try:
        await turn(client, "warm up")
        samples = [await timed(lambda i=i: turn(client, f"hello {i}")) for i in range(count)]
    finally:
        await client.disconnect()
    return connect, samples


async def acquire_times(sandbox: Sandbox, url: str, count: int) -> list[float]:
    """Time of a first acquire (create + start) for `count` new loops."""
    samples = []
    for index in range(count):
        spec = SandboxSpec(f"loop_start{index}", agent_env(url))
        samples.append(await timed(lambda spec=spec: sandbox.acquire(spec)))
    for index in range(count):
        await sandbox.remove(f"loop_start{index}")
    return samples


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


def row(name: str, value: str) -> None:
    print(f"| {name:<44} | {value:>22} |")


async def bench(turn_count: int, start_count: int) -> None:
    model = StandinModel()
    url = await model.start()
    with tempfile.TemporaryDirectory(prefix="lb-bench-") as scratch:
        data = Path(scratch)
        build = await timed(lambda: build_image(TAG, data / "podman", progress=lambda _: None))
        cached = await timed(lambda: build_image(TAG, data / "podman", progress=lambda _: None))
        settings = Settings(home=data / "podman", sandbox="podman", sandbox_image=TAG)
        podman = PodmanSandbox(data / "podman", CLI, settings)
        local = LocalSandbox(data / "local", CLI)
        await podman.start()
        await local.start()
        try:
            starts = await acquire_times(podman, url, start_count)
            spec = SandboxSpec("loop_turns", agent_env(url))
            podman_connect, podman_turns = await turns((await podman.acquire(spec))[0], turn_count)
            local_connect, local_turns = await turns((await local.acquire(spec))[0], turn_count)
            await podman.remove("loop_turns")
        finally:
            await podman.close()
            await run(*podman_argv(None), "rmi", TAG, env=podman_env())
    await model.stop()

    ms = 1000
    print(f"| {'measure':<44} | {'value':>22} |\n|{'-' * 46}|{'-' * 24}|")
    row("image build from nothing (s)", f"{build:.1f}")
    row("image build, .debs cached (s)", f"{cached:.1f}")
    row(
        f"container create+start, median of {start_count} (ms)",
        f"{statistics.median(starts) * ms:.0f}",
    )
    row(
        "agent connect, podman / local (ms)",
        f"{podman_connect * ms:.0f} / {local_connect * ms:.0f}",
    )
    for name, samples in (("podman", podman_turns), ("local", local_turns)):
        row(
            f"echo turn via {name}, median / p99 (ms)",
            f"{statistics.median(samples) * ms:.0f} / {p99(samples) * ms:.0f}",
        )
    ratio = statistics.median(podman_turns) / statistics.median(local_turns)
    row("turn overhead, podman / local (median)", f"{ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=100)
    parser.add_argument("--starts", type=int, default=10)
    arguments = parser.parse_args()
    asyncio.run(bench(arguments.turns, arguments.starts))


if __name__ == "__main__":
    main()
