"""Measure the sandboxes: image build, cold start and warm turns through Loop API v1.

    python -m bench.bench_sandbox [--turns 40] [--colds 10] [--no-build]

1. Builds the podman image under its own tag into a fresh data dir, so "from
   nothing" includes resolving and downloading the .debs; then again with them
   cached (`--no-build` skips this and uses the default image, built if missing).
2. Starts three loop servers (`python -m bench.bench_engine --serve`, each in its
   own process): `LOOPBRIDGE_SANDBOX=local`, `bubblewrap` and `podman`, all on the
   stand-in model (its own process too).
3. Cold start: create a loop and send its first message; the time from the
   create request to the first `assistant_delta` (for podman a container is made
   and started; for bubblewrap a sandbox; then the agent CLI starts inside).
4. Warm turns: the same echo turn on a warm loop of each server, interleaved
   (the order rotates), so machine noise hits all alike; the overhead is the
   difference of the medians from local's.

Needs root, podman and bubblewrap, like the sandboxes. The table goes to stdout,
progress to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx

from bench.bench_engine import (
    TurnTiming,
    agent_env,
    create_loop,
    log,
    running_standin,
    server_turn,
    table,
)
from core.config import Settings
from core.sandbox.image import build_image, podman_argv, podman_env, run
from core.sandbox.podman import SERVER_LABEL

TAG = "localhost/loopbridge-sandbox-bench:latest"
BUILD_TARGET_S = 60.0
COLD_TARGET_S = 1.5
# bubblewrap's cold start, beyond local's.
BUBBLEWRAP_COLD_TARGET_S = 0.3
OVERHEAD_TARGET_MS = 20.0
WARM_UP_TURNS = 2
TIERS = ("local", "bubblewrap", "podman")
LOOPBRIDGE = [sys.executable, "-m", "bridge.cli"]


async def timed(step: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await step()
    return time.perf_counter() - started


@contextlib.asynccontextmanager
async def sandbox_server(
    home: Path, sandbox: str, standin: str, image: str
) -> AsyncIterator[httpx.AsyncClient]:
    """`loopbridge serve` on `sandbox` in its own process; a client for its user."""
    env = {
        **os.environ,
        **agent_env(standin),
        "LOOPBRIDGE_HOME": str(home),
        "LOOPBRIDGE_SANDBOX": sandbox,
        "LOOPBRIDGE_SANDBOX_IMAGE": image,
        "LOOPBRIDGE_RATE_LIMIT_PER_MINUTE": "1000000",
    }
    token = (await run(*LOOPBRIDGE, "tokens", "create", "--user", "alice", env=env)).split()[-1]
    process = await asyncio.create_subprocess_exec(
        *LOOPBRIDGE, "serve", "--port", "0", env=env, stdout=asyncio.subprocess.PIPE
    )
    try:
        url = await serving_url(process)
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
            yield http
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 20)
        except TimeoutError:
            process.kill()
            await process.wait()
        await remove_containers(home)


async def serving_url(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    while line := (await asyncio.wait_for(process.stdout.readline(), 600)).decode():
        if found := re.search(r"(http://\S+/api/v1)", line):
            return found.group(1)
    raise SystemExit("the server ended before serving")


async def remove_containers(home: Path) -> None:
    podman = podman_argv(None)
    ids = await run(*podman, "ps", "-aq", "--filter", server_label(home), env=podman_env())
    if ids.split():
        await run(*podman, "rm", "-f", "-t", "0", *ids.split(), env=podman_env())


def server_label(home: Path) -> str:
    return f"label={SERVER_LABEL}={home.resolve()}"  # as the server labels its containers


async def cold_start(http: httpx.AsyncClient, number: int) -> float:
    """Create a loop and send its first message: seconds to the first `assistant_delta`."""
    started = time.perf_counter()
    loop = await create_loop(http, f"cold {number}")
    created = time.perf_counter() - started
    return created + (await server_turn(http, loop, "hello")).first_delta


async def warm_turns(
    servers: dict[str, httpx.AsyncClient], count: int
) -> dict[str, list[TurnTiming]]:
    loops = {tier: (http, await create_loop(http, "warm")) for tier, http in servers.items()}
    results: dict[str, list[TurnTiming]] = {tier: [] for tier in servers}
    tiers = list(servers)
    for number in range(WARM_UP_TURNS + count):
        shift = number % len(tiers)
        for tier in tiers[shift:] + tiers[:shift]:
            http, loop = loops[tier]
            timing = await server_turn(http, loop, f"warm turn {number}")
            if number >= WARM_UP_TURNS:
                results[tier].append(timing)
    return results


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def signed_ms(seconds: float) -> str:
    return f"{seconds * 1000:+.0f} ms"


def verdict(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def p99(values: list[float]) -> float:
    """The 99th percentile (nearest rank): the worst of fewer than 100 values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered)) - 1))]


def render_builds(build: float, cached: float) -> str:
    rows = [
        [
            "image build from nothing",
            f"{build:.1f} s",
            f"< {BUILD_TARGET_S:.0f} s",
            verdict(build < BUILD_TARGET_S),
        ],
        ["image build, .debs cached", f"{cached:.1f} s", "", ""],
    ]
    return table(["measure", "value", "target", "met"], rows)


def render(colds: dict[str, list[float]], warm: dict[str, list[TurnTiming]]) -> str:
    """One row per tier: cold start and warm turn, median and p99, against local."""
    cold_local = statistics.median(colds["local"])
    warm_local = statistics.median(t.first_delta for t in warm["local"])
    rows = []
    for tier in colds:
        cold = colds[tier]
        first = [t.first_delta for t in warm[tier]]
        cold_median, warm_median = statistics.median(cold), statistics.median(first)
        rows.append(
            [
                tier,
                ms(cold_median),
                ms(p99(cold)),
                f"{signed_ms(cold_median - cold_local)} ({cold_median / cold_local:.2f}×)",
                ms(warm_median),
                ms(p99(first)),
                f"{signed_ms(warm_median - warm_local)} ({warm_median / warm_local:.2f}×)",
            ]
        )
    head = [
        "tier",
        "cold median",
        "cold p99",
        "cold vs local",
        "warm median",
        "warm p99",
        "warm vs local",
    ]
    lines = [table(head, rows), ""]
    if "bubblewrap" in colds:
        extra = statistics.median(colds["bubblewrap"]) - cold_local
        lines.append(
            f"bubblewrap cold start within {BUBBLEWRAP_COLD_TARGET_S} s of local: "
            f"{verdict(extra < BUBBLEWRAP_COLD_TARGET_S)} ({signed_ms(extra)})"
        )
    if "podman" in colds:
        cold = statistics.median(colds["podman"])
        lines.append(f"podman cold start < {COLD_TARGET_S} s: {verdict(cold < COLD_TARGET_S)}")
    for tier in colds:
        if tier != "local":
            overhead = statistics.median(t.first_delta for t in warm[tier]) - warm_local
            lines.append(
                f"{tier} warm overhead to first delta < {OVERHEAD_TARGET_MS:.0f} ms: "
                f"{verdict(overhead * 1000 < OVERHEAD_TARGET_MS)} ({signed_ms(overhead)})"
            )
    return "\n".join(lines)


async def bench(turn_count: int, cold_count: int, build_image_too: bool) -> None:
    image = TAG if build_image_too else Settings().sandbox_image
    with tempfile.TemporaryDirectory(prefix="lb-bench-") as scratch:
        data = Path(scratch)
        if build_image_too:
            log("building the image from nothing")
            build = await timed(lambda: build_image(TAG, data / "podman", progress=log))
            log("building it again, .debs cached")
            cached = await timed(lambda: build_image(TAG, data / "podman", progress=log))
        try:
            async with contextlib.AsyncExitStack() as stack:
                standin = await stack.enter_async_context(running_standin())
                servers = {
                    tier: await stack.enter_async_context(
                        sandbox_server(data / tier, tier, standin, image)
                    )
                    for tier in TIERS
                }
                colds: dict[str, list[float]] = {tier: [] for tier in TIERS}
                for number in range(cold_count):
                    for tier, http in servers.items():
                        colds[tier].append(await cold_start(http, number))
                log(f"{cold_count} cold starts each")
                warm = await warm_turns(servers, turn_count)
                log(f"{turn_count} warm turns each")
        finally:
            if build_image_too:
                await run(*podman_argv(None), "rmi", "-f", TAG, env=podman_env())
    if build_image_too:
        print(render_builds(build, cached))
        print()
    print(render(colds, warm))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=40)
    parser.add_argument("--colds", type=int, default=10)
    parser.add_argument("--no-build", action="store_true", help="use the default image")
    arguments = parser.parse_args()
    asyncio.run(bench(arguments.turns, arguments.colds, not arguments.no_build))


if __name__ == "__main__":
    main()
