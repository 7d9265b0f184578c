"""Replicas benchmark: cross-replica watcher lag and failover time, on real processes.

    python -m bench.bench_replicas [--turns N] [--deltas N] [--failovers N]

A throwaway PostgreSQL cluster, the stand-in model in its own process, and real
`loopbridge serve` replicas on one database and one data directory (tests/replicas.py
runs them). Prints two Markdown tables (bench/README.md says what they mean):

(a) lag: a loop run by replica A, one watcher on A (its own fan-out) and `--watchers` on B
    (which follow the event log, woken by NOTIFY); `--turns` turns of `[[stamped: D]]` on
    A. For each event and watcher on B, lag = when it got it − when A's watcher got it.
(b) failover: a slow turn runs on A; A is killed with SIGKILL; the next message goes to
    B at once. Time from the kill to that message's first `assistant_delta` on B (and to
    the `error` that ends the killed turn for B's watcher). A fresh A joins for each round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncGenerator
from pathlib import Path

import httpx

from bench.bench_engine import AGENT_ENV, _spawn, _stop
from tests.postgres import Postgres, unavailable
from tests.replicas import Cluster

LAG_TARGET_MS = 100.0
FAILOVER_TARGET_SECONDS = 15.0
STAMP_DELAY = 0.01  # seconds between the stand-in's stamped deltas
TERMINAL = frozenset({"done", "interrupted", "error"})


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def sse(
    http: httpx.AsyncClient, method: str, path: str, **options: object
) -> AsyncGenerator[tuple[int | None, str, float], None]:
    """(id, event name, arrival time) of each event of a stream, pings left out."""
    async with http.stream(method, path, **options) as response:  # type: ignore[arg-type]
        assert response.status_code == 200, await response.aread()
        event_id: int | None = None
        async for line in response.aiter_lines():
            if line.startswith("id:"):
                event_id = int(line[3:].strip())
            elif line.startswith("event:"):
                name = line[6:].strip()
                if name != "ping":
                    yield event_id, name, time.monotonic()
                event_id = None


async def watch(
    http: httpx.AsyncClient, loop: str, seen: dict[int, float], opened: asyncio.Event
) -> None:
    opened.set()
    async for event_id, _, arrived in sse(http, "GET", f"/loops/{loop}/events"):
        if event_id is not None:
            seen[event_id] = arrived


async def turn(http: httpx.AsyncClient, loop: str, content: str) -> list[tuple[str, float]]:
    seen = []
    async for _, name, arrived in sse(
        http, "POST", f"/loops/{loop}/messages", json={"content": content}
    ):
        seen.append((name, arrived))
        if name in TERMINAL:
            break
    return seen


async def bench_lag(cluster: Cluster, turns: int, deltas: int, count: int) -> list[float]:
    a, b = cluster["a"], cluster["b"]
    loop = (await a.http.post("/loops", json={"title": "lag"})).json()["id"]
    await turn(a.http, loop, "warm up")  # a owns the loop and its agent is warm
    on_a: dict[int, float] = {}
    on_b: list[dict[int, float]] = [{} for _ in range(count)]
    opened = [asyncio.Event() for _ in range(count + 1)]
    watchers = [asyncio.create_task(watch(a.http, loop, on_a, opened[0]))] + [
        asyncio.create_task(watch(b.http, loop, seen, ready))
        for seen, ready in zip(on_b, opened[1:], strict=True)
    ]
    await asyncio.gather(*(event.wait() for event in opened))
    await asyncio.sleep(1.0)  # both watchers attached
    try:
        for number in range(turns):
            events = await turn(a.http, loop, f"[[stamped: {deltas}]]")
            assert events[-1][0] == "done", events[-1]
            log(f"(a) turn {number + 1}/{turns}")
        newest = max(on_a)
        for _ in range(100):
            if all(newest in seen for seen in on_b):
                break
            await asyncio.sleep(0.05)
    finally:
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
    for seen in on_b:
        missing = [event_id for event_id in on_a if event_id not in seen]
        assert not missing, f"a watcher on B missed {len(missing)} events"
    lags = [(seen[i] - on_a[i]) * 1000 for seen in on_b for i in sorted(on_a)]
    first = [(on_b[0][i] - on_a[i]) * 1000 for i in sorted(on_a)]  # per turn: one watcher
    share = len(first) // turns
    for number in range(turns):
        part = first[number * share : (number + 1) * share]
        log(
            f"(a) turn {number + 1}: p50 {percentile(part, 0.5):.1f} ms, "
            f"p99 {percentile(part, 0.99):.1f} ms, max {max(part):.1f} ms"
        )
    return lags


async def bench_failover(cluster: Cluster, round_number: int) -> tuple[float, float]:
    """(seconds to the next message's first delta on B, seconds to the killed turn's error
    on B's watcher), both from the kill."""
    a, b = cluster["a"], cluster["b"]
    loop = (await a.http.post("/loops", json={"title": "failover"})).json()["id"]
    await turn(a.http, loop, "one")  # a owns the loop
    error_at: list[float] = []

    async def watch_error() -> None:
        async for _, name, arrived in sse(b.http, "GET", f"/loops/{loop}/events"):
            if name == "error":
                error_at.append(arrived)
                return

    watcher = asyncio.create_task(watch_error())
    await asyncio.sleep(0.5)
    slow = sse(a.http, "POST", f"/loops/{loop}/messages", json={"content": "[[slow: 60]]"})
    async for _, name, _ in slow:
        if name == "assistant_delta":
            break
    killed = time.monotonic()
    await cluster.kill("a")
    with contextlib.suppress(Exception):
        await slow.aclose()
    first_delta = None
    async for _, name, arrived in sse(
        b.http, "POST", f"/loops/{loop}/messages", json={"content": "after the kill"}
    ):
        if name == "assistant_delta" and first_delta is None:
            first_delta = arrived
        if name in TERMINAL:
            assert name == "done", name
            break
    await asyncio.wait_for(watcher, 30)
    assert first_delta is not None
    log(f"(b) round {round_number}: first delta {first_delta - killed:.2f} s after the kill")
    await cluster.start("a")  # a fresh A for the next round
    return first_delta - killed, error_at[0] - killed


def lag_table(lags: list[float], watchers: int) -> str:
    p50, p99 = percentile(lags, 0.5), percentile(lags, 0.99)
    verdict = "met" if p99 < LAG_TARGET_MS else "MISSED"
    return "\n".join(
        [
            "| watchers on B | events × watchers | p50 ms | p99 ms | max ms | mean ms "
            "| target p99 |",
            "|---:|---:|---:|---:|---:|---:|---|",
            f"| {watchers} | {len(lags)} | {p50:.1f} | {p99:.1f} | {max(lags):.1f} | "
            f"{statistics.fmean(lags):.1f} | < {LAG_TARGET_MS:.0f} ms: {verdict} |",
        ]
    )


def failover_table(rounds: list[tuple[float, float]]) -> str:
    lines = [
        "| round | kill → error on B's watcher, s | kill → next message's first delta on B, s |"
        " target |",
        "|---:|---:|---:|---|",
    ]
    for number, (delta, error) in enumerate(rounds, 1):
        verdict = "met" if delta < FAILOVER_TARGET_SECONDS else "MISSED"
        lines.append(f"| {number} | {error:.2f} | {delta:.2f} | < 15 s: {verdict} |")
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    if (reason := unavailable()) is not None:
        raise SystemExit(f"bench_replicas: {reason}")
    pg_root = Path(tempfile.mkdtemp(prefix="loopbridge-bench-pg-"))
    root = Path(tempfile.mkdtemp(prefix="loopbridge-bench-replicas-"))
    postgres = Postgres(pg_root)
    standin_args = [sys.executable, "-m", "bridge.standin", "--stamp-delay", str(STAMP_DELAY)]
    standin, url = await _spawn(standin_args, {}, "http")
    cluster = Cluster(root / "home", postgres.start())
    os.environ.update({**AGENT_ENV, "ANTHROPIC_BASE_URL": url})
    try:
        await cluster.create_token()
        await cluster.start("a", "b")
        log("replicas a and b serve")
        lags = await bench_lag(cluster, args.turns, args.deltas, args.watchers)
        rounds = [await bench_failover(cluster, n + 1) for n in range(args.failovers)]
        print("(a) cross-replica watcher lag (owner's watcher → other replica's watcher)\n")
        print(lag_table(lags, args.watchers))
        print("\n(b) failover after kill -9 of the owner\n")
        print(failover_table(rounds))
    finally:
        await cluster.stop()
        await _stop(standin)
        postgres.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(pg_root, ignore_errors=True)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_replicas", description=__doc__)
    parser.add_argument("--turns", type=int, default=5, help="stamped turns in (a)")
    parser.add_argument("--deltas", type=int, default=200, help="deltas per stamped turn")
    parser.add_argument("--watchers", type=int, default=10, help="watchers on B in (a)")
    parser.add_argument("--failovers", type=int, default=3, help="rounds of (b)")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(arguments()))
