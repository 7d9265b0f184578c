"""Measure the podman sandbox: image build, cold start and warm turns through Loop API v1.

    python -m bench.bench_sandbox [--turns 40] [--colds 8]

1. Builds the image under its own tag into a fresh data dir, so "from nothing"
   includes resolving and downloading the .debs; then again with them cached.
2. Starts two loop servers (`python -m bench.bench_engine --serve`, each in its own
   process), one with `LOOPBRIDGE_SANDBOX=podman` on that image and one `local`,
   both on the stand-in model (its own process too).
3. Cold start: create a loop and send its first message; the time from the
   create request to the first `assistant_delta` (a container is created and
   started, and the agent CLI starts inside it).
4. Warm turns: the same echo turn on a warm loop of each server, interleaved
   (and which goes first alternates), so machine noise hits both alike; the
   overhead is the difference of the medians.

Needs root and podman, like the sandbox. The tables go to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx

from bench.bench_engine import (
    TurnTiming,
    create_loop,
    log,
    running_server,
    running_standin,
    server_turn,
    table,
)
from core.sandbox.image import build_image, podman_argv, podman_env, run
from core.sandbox.podman import SERVER_LABEL

TAG = "localhost/loopbridge-sandbox-bench:latest"
BUILD_TARGET_S = 60.0
COLD_TARGET_S = 1.5
OVERHEAD_TARGET_MS = 20.0
WARM_UP_TURNS = 2


async def timed(step: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await step()
    return time.perf_counter() - started


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """Variables a server process started inside the block inherits."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.asynccontextmanager
async def sandbox_server(
    home: Path, sandbox: str, standin: str
) -> AsyncIterator[httpx.AsyncClient]:
    """A loop server on `sandbox` in its own process; a client for its user."""
    try:
        with environ(LOOPBRIDGE_SANDBOX=sandbox, LOOPBRIDGE_SANDBOX_IMAGE=TAG):
            async with running_server(home, standin) as server, server.client() as http:
                yield http
    finally:
        # The bench server ends on SIGTERM without closing its engine: its containers
        # would outlive the data dir.
        await remove_containers(home)


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
    podman: httpx.AsyncClient, local: httpx.AsyncClient, count: int
) -> tuple[list[TurnTiming], list[TurnTiming]]:
    loops = [(podman, await create_loop(podman, "warm")), (local, await create_loop(local, "warm"))]
    results: tuple[list[TurnTiming], list[TurnTiming]] = ([], [])
    for number in range(WARM_UP_TURNS + count):
        order = [0, 1] if number % 2 else [1, 0]
        for index in order:
            http, loop = loops[index]
            timing = await server_turn(http, loop, f"warm turn {number}")
            if number >= WARM_UP_TURNS:
                results[index].append(timing)
    return results


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def verdict(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def median_of(timings: list[TurnTiming], field: str) -> float:
    return statistics.median(getattr(t, field) for t in timings)


def render(
    build: float,
    cached: float,
    colds: dict[str, list[float]],
    warm: tuple[list[TurnTiming], list[TurnTiming]],
) -> str:
    podman, local = warm
    cold = statistics.median(colds["podman"])
    rows = [
        ["image build from nothing", f"{build:.1f} s", f"< {BUILD_TARGET_S:.0f} s",
         verdict(build < BUILD_TARGET_S)],
        ["image build, .debs cached", f"{cached:.1f} s", "", ""],
        [f"cold start to first delta, podman (median of {len(colds['podman'])})", ms(cold),
         f"< {COLD_TARGET_S} s", verdict(cold < COLD_TARGET_S)],
        ["cold start to first delta, podman (worst)", ms(max(colds["podman"])), "", ""],
        [f"cold start to first delta, local (median of {len(colds['local'])})",
         ms(statistics.median(colds["local"])), "", ""],
    ]
    for field, name in (("first_delta", "first delta"), ("done", "done")):
        overhead = median_of(podman, field) - median_of(local, field)
        rows += [
            [f"warm turn to {name}, podman / local (median of {len(podman)})",
             f"{ms(median_of(podman, field))} / {ms(median_of(local, field))}", "", ""],
            [f"warm turn overhead to {name}, podman - local", ms(overhead),
             f"< {OVERHEAD_TARGET_MS:.0f} ms", verdict(overhead * 1000 < OVERHEAD_TARGET_MS)],
        ]
    return table(["measure", "value", "target", "met"], rows)


async def bench(turn_count: int, cold_count: int) -> None:
    with tempfile.TemporaryDirectory(prefix="lb-bench-") as scratch:
        data = Path(scratch)
        log("building the image from nothing")
        build = await timed(lambda: build_image(TAG, data / "podman", progress=log))
        log("building it again, .debs cached")
        cached = await timed(lambda: build_image(TAG, data / "podman", progress=log))
        try:
            async with (
                running_standin() as standin,
                sandbox_server(data / "podman", "podman", standin) as podman,
                sandbox_server(data / "local", "local", standin) as local,
            ):
                colds: dict[str, list[float]] = {"podman": [], "local": []}
                for number in range(cold_count):
                    colds["podman"].append(await cold_start(podman, number))
                    colds["local"].append(await cold_start(local, number))
                log(f"{cold_count} cold starts each")
                warm = await warm_turns(podman, local, turn_count)
                log(f"{turn_count} warm turns each")
        finally:
            await run(*podman_argv(None), "rmi", "-f", TAG, env=podman_env())
    print(render(build, cached, colds, warm))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=40)
    parser.add_argument("--colds", type=int, default=8)
    arguments = parser.parse_args()
    asyncio.run(bench(arguments.turns, arguments.colds))


if __name__ == "__main__":
    main()
