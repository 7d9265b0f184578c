"""Files benchmark through Loop API v1: a 20 MB upload and download, time and server memory.

    python -m bench.bench_files [--mb 20] [--rounds 3]

The server runs in its own process (`bench.bench_engine --serve`, local sandbox); the
client streams the upload from a generator and reads the download in chunks, as an
adapter would, so neither side holds the file. The server's RSS is sampled every
5 ms during each transfer: "peak over idle" is the highest sample minus the RSS just
before the transfer. The target is < 30 MB, i.e. memory that does not grow with the
file (streamed). Prints one Markdown table; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from bench.bench_engine import ServerProcess, log, running_server, table

CHUNK = 64 * 1024
SAMPLE_SECONDS = 0.005
MB = 1_000_000


@contextlib.asynccontextmanager
async def peak_rss(server: ServerProcess) -> AsyncIterator[list[int]]:
    """[idle RSS, peak RSS] of the server while the block runs."""
    found = [server.rss(), 0]
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            found[1] = max(found[1], server.rss())
            await asyncio.sleep(SAMPLE_SECONDS)

    sampler = asyncio.create_task(sample())
    try:
        yield found
    finally:
        stop.set()
        await sampler
        found[1] = max(found[1], server.rss())


async def body(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), CHUNK):
        yield data[start : start + CHUNK]


async def transfer_round(server: ServerProcess, loop: str, data: bytes) -> dict[str, float]:
    path = f"/loops/{loop}/files/uploads/big.bin"
    async with server.client() as http:
        async with peak_rss(server) as up_rss:
            began = time.perf_counter()
            r = await http.put(path, content=body(data))
            up_time = time.perf_counter() - began
        assert r.status_code == 201, r.text
        digest = hashlib.sha256()
        async with peak_rss(server) as down_rss:
            began = time.perf_counter()
            async with http.stream("GET", path) as response:
                assert response.status_code == 200
                async for chunk in response.aiter_bytes(CHUNK):
                    digest.update(chunk)
            down_time = time.perf_counter() - began
        assert digest.digest() == hashlib.sha256(data).digest(), "the download differs"
    return {
        "up_time": up_time,
        "up_peak": up_rss[1] - up_rss[0],
        "down_time": down_time,
        "down_peak": down_rss[1] - down_rss[0],
    }


async def main(size_mb: int, rounds: int) -> None:
    data = os.urandom(size_mb * MB)
    with tempfile.TemporaryDirectory(prefix="lb-bench-files-") as home:
        # No agent runs here: the model URL only has to be well-formed.
        async with running_server(Path(home), "http://127.0.0.1:9") as server:
            async with server.client() as http:
                loop = (await http.post("/loops", json={"title": "bench"})).json()["id"]
            idle = server.rss()
            results = []
            for index in range(rounds):
                results.append(await transfer_round(server, loop, data))
                log(f"round {index + 1}/{rounds}: {results[-1]}")
    rows = []
    for kind, label in (("up", "upload (`PUT /files`)"), ("down", "download (`GET /files`)")):
        seconds = statistics.median(r[f"{kind}_time"] for r in results)
        peak = max(r[f"{kind}_peak"] for r in results)
        rows.append(
            [
                label,
                f"{size_mb} MB",
                f"{seconds * 1000:.0f} ms",
                f"{size_mb / seconds:.0f} MB/s",
                f"{peak / 2**20:.1f} MiB",
                "yes" if peak < 30 * 2**20 else "**no**",
            ]
        )
    header = ["transfer", "size", "time (median)", "rate", "server peak RSS over idle", "< 30 MB"]
    print(table(header, rows))
    print(f"\nServer RSS at idle: {idle / 2**20:.0f} MiB; {rounds} rounds, the worst peak shown.")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=20, help="file size in MB (default 20)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.mb, args.rounds))


if __name__ == "__main__":
    cli()
