"""Engine benchmarks through Loop API v1: turn latency, watcher fan-out, idle-loop memory.

    python -m bench.bench_engine [--turns N] [--watchers N] [--loops N] [--quick]

Prints three Markdown tables (see bench/README.md for what they mean):

(a) turn latency through the server vs straight through ClaudeSDKClient, interleaved;
(b) one loop with W watchers on ``GET /events`` during a ``[[stamped: D]]`` turn;
(c) the server's RSS per idle loop (loops created through the API, no agent started).

The stand-in model and the server each run in their own process, so the bench's
clients (all in this process) do not share an event loop with what they measure.
``python -m bench.bench_engine --serve HOME`` is that server process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import math
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from claude_agent_sdk import (
    ClaudeAgentOptions,
    ClaudeSDKClient,
    PermissionResultAllow,
    ResultMessage,
    StreamEvent,
    ToolPermissionContext,
)

from bridge.cli.serve import run as run_server
from bridge.cli.serve import settle_heap
from bridge.contract.events import TERMINAL

ROOT = Path(__file__).resolve().parent.parent
AGENT_ENV = {
    "ANTHROPIC_API_KEY": "sk-standin",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "CLAUDE_CODE_MAX_RETRIES": "0",
}
SERVER_READY = "BENCH-SERVER "
STARTUP_SECONDS = 60.0
STOP_SECONDS = 15.0
# The bench sends far more than a person would; the per-user rate limit is not under test.
UNLIMITED_RATE = 1_000_000_000
LISTEN_BACKLOG = 2048  # uvicorn's default when it binds itself

LATENCY_TARGET_MS = 10.0
LATENCY_ROUNDS = 4
LAG_TARGET_MS = 50.0
MEMORY_TARGET_BYTES = 1 << 20
STAMPED_DELTAS = 500
OPEN_SECONDS = 60.0
DRAIN_SECONDS = 60.0
CREATE_CONCURRENCY = 8
WARMUP_LOOPS = 200
PAGE_LIMIT = 100

TERMINAL_MARKS = tuple(f"event: {name}".encode() for name in TERMINAL)
MARK_TAIL = max(len(mark) for mark in TERMINAL_MARKS)

QUICK = {"turns": 8, "watchers": 20, "loops": 500}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- numbers ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1); with 30 samples p99 is the maximum."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def mib(size: int) -> str:
    return f"{size / (1 << 20):.1f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ---- server-sent events ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    """One SSE event, with the time the network chunk that completed it arrived."""

    at: float
    name: str
    data: str


class SseParser:
    """An incremental SSE parser that is cheap enough for hundreds of streams."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes, at: float) -> list[Frame]:
        # The server ends lines with CRLF; a CR left at a chunk's end joins the next LF.
        self._buffer = (self._buffer + chunk).replace(b"\r\n", b"\n")
        *blocks, self._buffer = self._buffer.split(b"\n\n")
        return [frame for block in blocks if (frame := _frame(block, at)) is not None]


def _frame(block: bytes, at: float) -> Frame | None:
    name, data = "message", []
    for line in block.decode().split("\n"):
        key, _, value = line.partition(":")
        if key == "event":
            name = value.removeprefix(" ")
        elif key == "data":
            data.append(value.removeprefix(" "))
    return Frame(at, name, "\n".join(data)) if data else None


def parse_frames(chunks: Iterable[tuple[float, bytes]]) -> list[Frame]:
    parser = SseParser()
    return [frame for at, chunk in chunks for frame in parser.feed(chunk, at)]


def stamp_arrivals(texts: Iterable[tuple[float, str]]) -> list[tuple[float, float]]:
    """(arrival, stamp) for every `<unix time>;` stamp in a stream of delta texts.

    A stamp belongs to the delta that brought its `;`, so a stamp split across
    deltas (or several stamps merged into one delta) still counts once.
    """
    pending, arrivals = "", []
    for at, text in texts:
        pending += text
        *stamps, pending = pending.split(";")
        arrivals += [(at, float(stamp)) for stamp in stamps if stamp.strip()]
    return arrivals


def delta_texts(frames: Iterable[Frame]) -> list[tuple[float, str]]:
    return [(f.at, json.loads(f.data)["text"]) for f in frames if f.name == "assistant_delta"]


# ---- processes: the stand-in model and the server ---------------------------------------


Process = asyncio.subprocess.Process


async def _spawn(args: Sequence[str], env: dict[str, str], ready: str) -> tuple[Process, str]:
    """Start a process; return it with the first stdout line that starts with `ready`."""
    process = await asyncio.create_subprocess_exec(
        *args, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(STARTUP_SECONDS):
            while line := (await process.stdout.readline()).decode():
                if line.startswith(ready):
                    return process, line.strip()
        raise RuntimeError(f"{' '.join(args)} ended before it was ready")
    except BaseException:
        await _stop(process)
        raise


async def _stop(process: Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), STOP_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()


@contextlib.asynccontextmanager
async def running_standin() -> AsyncIterator[str]:
    """The stand-in model in its own process; yields its URL."""
    args = [sys.executable, "-m", "bridge.standin"]
    process, url = await _spawn(args, dict(os.environ), "http")
    try:
        yield url
    finally:
        await _stop(process)


def agent_env(standin_url: str) -> dict[str, str]:
    return {**AGENT_ENV, "ANTHROPIC_BASE_URL": standin_url}


@dataclass
class ServerProcess:
    """A loop server in its own process, and a token for the user "alice"."""

    process: Process
    url: str
    token: str
    home: Path | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self, connections: int = 20, read_timeout: float | None = 60.0) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url + "/api/v1",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=httpx.Timeout(60.0, read=read_timeout),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )

    def rss(self) -> int:
        """VmRSS of the server process, in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process (not of its agent children)."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.asynccontextmanager
async def running_server(
    home: Path, standin_url: str, nagle: bool = False, trace: bool = False
) -> AsyncIterator[ServerProcess]:
    args = [sys.executable, "-m", "bench.bench_engine", "--serve", str(home)]
    args += ["--nagle"] if nagle else []
    args += ["--trace"] if trace else []
    env = {**os.environ, **agent_env(standin_url)}
    process, line = await _spawn(args, env, SERVER_READY)
    info = json.loads(line.removeprefix(SERVER_READY))
    try:
        yield ServerProcess(process, info["url"], info["token"], home)
    finally:
        await _stop(process)


def listen(nagle: bool) -> socket.socket:
    """A listener on 127.0.0.1 whose connections have TCP_NODELAY, as uvicorn's own bind does.

    asyncio sets TCP_NODELAY on an accepted connection only if `sock.proto` is IPPROTO_TCP;
    `socket.create_server()` leaves it 0, so every second small write (a body after its
    headers, an SSE event after the last) waits for the peer's delayed ACK, ~40 ms.
    `nagle=True` binds that way, to show it.
    """
    if nagle:
        return socket.create_server(("127.0.0.1", 0), backlog=LISTEN_BACKLOG)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(LISTEN_BACKLOG)
    return sock


STALL_MS = 10.0
LOOP_TICK = 0.005


def stall_log(home: Path) -> Path:
    return home / "stalls.jsonl"


Note = Callable[[dict[str, Any]], None]


def stall(what: str, took: float, cpu: float | None = None) -> dict[str, Any]:
    entry = {"at": time.time(), "what": what, "ms": took * 1000}
    if cpu is not None:  # the loop's own CPU meanwhile: its own work, or a CPU others took
        entry["cpu_ms"] = cpu * 1000
    return entry


async def watch_loop(note: Note, what: str) -> None:
    """Note each time this event loop runs `STALL_MS` late."""
    while True:
        before, cpu = time.perf_counter(), time.thread_time()
        await asyncio.sleep(LOOP_TICK)
        late = time.perf_counter() - before - LOOP_TICK
        if late * 1000 >= STALL_MS:
            note(stall(what, late, time.thread_time() - cpu))


def trace_stalls(home: Path) -> asyncio.Task[None]:
    """In the server: log each garbage collection of 2+ ms or of the oldest generation, each
    time the event loop ran `STALL_MS` late, and when the engine got each stamped delta, to
    files in `home` (`--trace`)."""
    out = stall_log(home).open("a", buffering=1)
    began: list[float] = []

    def note(entry: dict[str, Any]) -> None:
        out.write(json.dumps(entry) + "\n")

    def collected(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began.append(time.perf_counter())
        elif began:
            took = time.perf_counter() - began.pop()
            if took >= 0.002 or info["generation"] == 2:
                note(stall(f"server gc gen{info['generation']} ({info['collected']} freed)", took))

    from core.emitter import Emitter

    publish = Emitter.publish

    def published(emitter: Emitter, name: str, data: dict[str, Any], turn_id: Any) -> None:
        # When the engine got each stamped delta from the agent: the CLI's share of the lag.
        if name == "assistant_delta":
            received.write(json.dumps([time.time(), data["text"]]) + "\n")
        publish(emitter, name, data, turn_id)

    received = (home / "received.jsonl").open("a", buffering=1)
    Emitter.publish = published  # type: ignore[method-assign]
    gc.callbacks.append(collected)
    return asyncio.create_task(watch_loop(note, "server's event loop late"))


def read_received(home: Path) -> list[tuple[float, float]]:
    """(when the engine got it, stamp) for every stamped delta the traced server received."""
    path = home / "received.jsonl"
    if not path.exists():
        return []
    texts = [tuple(json.loads(line)) for line in path.read_text().splitlines() if line]
    stamped = [(at, text) for at, text in texts if not text.strip("0123456789.;")]
    return stamp_arrivals(stamped)


def read_stalls(home: Path, start: float, end: float) -> list[dict[str, Any]]:
    path = stall_log(home)
    if not path.exists():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [e for e in entries if start <= e["at"] <= end]


async def serve(home: Path, nagle: bool, trace: bool = False) -> None:
    """The server process: engine + uvicorn on 127.0.0.1, until SIGTERM."""
    # Imported here: only the server process needs the engine (the bench's clients don't).
    import uvicorn

    from bridge.server.app import create_app
    from core.config import load_settings
    from core.engine import Engine

    # Agents run as local processes here: the container path is bench_sandbox's subject.
    engine = Engine(load_settings(home=home, rate_limit_per_minute=UNLIMITED_RATE, sandbox="local"))
    await engine.start()
    listener = listen(nagle)
    config = uvicorn.Config(
        create_app(engine, manage_engine=False),
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started:  # noqa: ASYNC110 (uvicorn has no "started" event to await)
        await asyncio.sleep(0.01)
    settle_heap()  # as `loopbridge serve` does once started
    tracer = trace_stalls(home) if trace else None  # noqa: F841 (runs until the server stops)
    await engine.accounts.ensure_user("alice")
    _, token = await engine.accounts.create_token("alice", "bench")
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    print(SERVER_READY + json.dumps({"url": url, "token": token}), flush=True)
    try:
        await task
    finally:
        await engine.close()


@contextlib.asynccontextmanager
async def py_spy(pid: int, output: Path | None) -> AsyncIterator[None]:
    """Sample the server with py-spy while the block runs (`--spy FILE`; .txt = raw stacks)."""
    if output is None:
        yield
        return
    fmt = "raw" if output.suffix == ".txt" else "flamegraph"
    exe = Path(sys.executable).parent / "py-spy"
    if not exe.exists():
        raise SystemExit(f"--spy needs py-spy next to {sys.executable}: pip install py-spy")
    spy = await asyncio.create_subprocess_exec(
        str(exe), "record", "--pid", str(pid), "--rate", "250", "--format", fmt,
        "--output", str(output), stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await asyncio.sleep(1.0)  # attaching takes a moment
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        await spy.wait()
        log(f"py-spy profile of the server: {output}")


# ---- straight through the SDK (the baseline) --------------------------------------------


async def _allow(
    tool: str, tool_input: dict[str, Any], context: ToolPermissionContext
) -> PermissionResultAllow:
    return PermissionResultAllow()


@contextlib.asynccontextmanager
async def direct_agent(standin_url: str, home: Path) -> AsyncIterator[ClaudeSDKClient]:
    """A warm ClaudeSDKClient set up like the engine sets up a loop's agent."""
    (home / ".claude").mkdir(parents=True, exist_ok=True)
    env = {**agent_env(standin_url), "HOME": str(home), "CLAUDE_CONFIG_DIR": str(home / ".claude")}
    options = ClaudeAgentOptions(
        include_partial_messages=True,
        cwd=str(home),
        env=env,
        permission_mode="default",
        setting_sources=[],
        # What the engine passes too, so both CLIs do the same work per turn.
        system_prompt={"type": "preset", "preset": "claude_code"},
        can_use_tool=_allow,
    )
    async with ClaudeSDKClient(options) as client:
        yield client


def _is_text_delta(message: object) -> bool:
    if not isinstance(message, StreamEvent) or message.parent_tool_use_id is not None:
        return False
    event = message.event
    return event.get("type") == "content_block_delta" and event["delta"].get("type") == "text_delta"


async def direct_stream(
    client: ClaudeSDKClient, text: str, clock: Callable[[], float]
) -> tuple[float, list[tuple[float, str]], float]:
    """Send one message straight to the SDK: (start, [(arrival, delta text)], done)."""
    start = clock()
    deltas: list[tuple[float, str]] = []
    await client.query(text)
    async for message in client.receive_response():
        now = clock()
        if _is_text_delta(message):
            deltas.append((now, message.event["delta"]["text"]))
        elif isinstance(message, ResultMessage):
            if message.is_error:
                raise RuntimeError(f"direct turn failed: {message.result}")
            return start, deltas, now
    raise RuntimeError("the SDK stream ended without a result")


# ---- (a) turn latency --------------------------------------------------------------------


@dataclass(frozen=True)
class TurnTiming:
    first_delta: float
    done: float
    started: float | None = None  # the `started` event (server path only)


async def server_turn(http: httpx.AsyncClient, loop_id: str, text: str) -> TurnTiming:
    """Send one message through the server; times are taken when the bytes arrive."""
    clock = time.perf_counter
    start = clock()
    seen: dict[str, float] = {}  # first arrival of each event name
    parser = SseParser()
    async with http.stream("POST", f"/loops/{loop_id}/messages", json={"content": text}) as resp:
        await _expect_stream(resp)
        # Read to the end (the server closes after `done`), so the connection is reused.
        async for chunk in resp.aiter_raw():
            now = clock()
            for frame in parser.feed(chunk, now):
                seen.setdefault(frame.name, now - start)
                if frame.name in TERMINAL - {"done"}:
                    raise RuntimeError(f"server turn ended {frame.name}: {frame.data}")
    if "done" not in seen or "assistant_delta" not in seen:
        raise RuntimeError(f"server turn incomplete: saw {sorted(seen)}")
    return TurnTiming(seen["assistant_delta"], seen["done"], seen.get("started"))


async def direct_turn(client: ClaudeSDKClient, text: str) -> TurnTiming:
    start, deltas, done = await direct_stream(client, text, time.perf_counter)
    if not deltas:
        raise RuntimeError("direct turn had no text delta")
    return TurnTiming(deltas[0][0] - start, done - start)


async def _expect_stream(resp: httpx.Response) -> None:
    if resp.status_code != 200:
        await resp.aread()
        raise RuntimeError(f"{resp.request.method} {resp.url}: {resp.status_code} {resp.text}")


async def create_loop(http: httpx.AsyncClient, title: str) -> str:
    resp = await http.post("/loops", json={"title": title})
    resp.raise_for_status()
    return str(resp.json()["id"])


async def bench_latency(
    turns: int, http: httpx.AsyncClient, standin_url: str, home: Path
) -> tuple[list[TurnTiming], list[TurnTiming]]:
    """Alternate the two paths turn by turn (and which goes first), in `LATENCY_ROUNDS`
    rounds of a fresh loop and a fresh direct agent each: one CLI process can be
    faster or slower than another by ~10 ms for its whole life, which one pair of
    processes would count as the server's. The first turn of each round is dropped."""
    server: list[TurnTiming] = []
    direct: list[TurnTiming] = []
    per_round = math.ceil(turns / LATENCY_ROUNDS)
    for round_number in range(LATENCY_ROUNDS):
        loop_id = await create_loop(http, f"bench latency {round_number}")
        async with direct_agent(standin_url, home / f"direct-{round_number}") as client:
            via_server = functools.partial(server_turn, http, loop_id)
            via_direct = functools.partial(direct_turn, client)
            for number in range(per_round + 1):
                paths = [(via_server, server), (via_direct, direct)]
                if number % 2:
                    paths.reverse()
                for run, results in paths:
                    timing = await run(f"bench latency turn {number}")
                    if number:
                        results.append(timing)
        (await http.delete(f"/loops/{loop_id}")).raise_for_status()  # archived: its agent stops
        log(f"(a) round {round_number + 1}/{LATENCY_ROUNDS}: {len(server)} turns each")
    return server, direct


def render_latency(server: list[TurnTiming], direct: list[TurnTiming]) -> str:
    rows = []
    for label, pick in (
        ("time to first `assistant_delta`", lambda t: t.first_delta),
        ("time to `done`", lambda t: t.done),
    ):
        s, d = [pick(t) for t in server], [pick(t) for t in direct]
        diff = statistics.median(s) - statistics.median(d)
        rows.append([
            label, ms(statistics.median(s)), ms(percentile(s, 0.99)),
            ms(statistics.median(d)), ms(percentile(d, 0.99)), ms(diff),
            f"< {LATENCY_TARGET_MS:.0f} ms", verdict(diff * 1000 < LATENCY_TARGET_MS),
        ])  # fmt: skip
    header = [
        "metric", "server median (ms)", "server p99", "direct SDK median (ms)", "direct p99",
        "Δ median (server − direct, ms)", "target", "result",
    ]  # fmt: skip
    title = (
        f"### (a) Turn latency: server (HTTP+SSE) vs direct ClaudeSDKClient — "
        f"{len(server)} warm turns each, interleaved, in {LATENCY_ROUNDS} rounds of fresh agents, "
        "echo scenario"
    )
    text = f"{title}\n\n{table(header, rows)}"
    started = [t.started for t in server if t.started is not None]
    if started:
        text += (
            f"\n\n- server only: `POST` → `started` median {ms(statistics.median(started))} ms, "
            f"p99 {ms(percentile(started, 0.99))} ms (the engine's work before the agent is asked)"
        )
    return text


# ---- (b) watcher fan-out -------------------------------------------------------------------


@dataclass
class Recording:
    """The raw chunks of one SSE stream, each with its arrival time (time.time())."""

    chunks: list[tuple[float, bytes]] = field(default_factory=list)
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    error: str | None = None
    # The end of the last chunk, where a terminal event's name may have begun.
    tail: bytes = b""

    def add(self, chunk: bytes) -> None:
        """Keep a chunk with its arrival time; `ended` once a terminal event arrives."""
        self.chunks.append((time.time(), chunk))
        if any(mark in self.tail + chunk for mark in TERMINAL_MARKS):
            self.ended.set()
        self.tail = chunk[-MARK_TAIL:]

    def stamps(self) -> list[tuple[float, float]]:
        return stamp_arrivals(delta_texts(parse_frames(self.chunks)))


async def record(http: httpx.AsyncClient, rec: Recording, method: str, url: str, **kw: Any) -> None:
    """Read a stream into `rec` until it closes or is cancelled; `ended` at a terminal event."""
    try:
        async with http.stream(method, url, **kw) as resp:
            await _expect_stream(resp)
            rec.opened.set()
            async for chunk in resp.aiter_raw():
                rec.add(chunk)
    except Exception as exc:  # reported with the results
        rec.error = f"{type(exc).__name__}: {exc}"
    finally:
        rec.opened.set()
        rec.ended.set()


class Watcher(asyncio.Protocol):
    """A bare-socket `GET /events` reader: the cheapest client that still reads every byte.

    httpx costs ~100 µs of CPU per chunk and, with 200 streams on a 2-core machine,
    takes the CPU the server needs; this one only timestamps what arrives, and the
    bytes are de-chunked and parsed after the turn.
    """

    transport: asyncio.BaseTransport

    def __init__(self, rec: Recording) -> None:
        self.rec = rec

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.rec.add(data)
        self.rec.opened.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.rec.opened.set()
        self.rec.ended.set()

    def body(self) -> list[tuple[float, bytes]]:
        """The response body's pieces with their arrival times, chunked encoding removed."""
        raw = b"".join(chunk for _, chunk in self.rec.chunks)
        head, sep, _ = raw.partition(b"\r\n\r\n")
        if not sep or not head.startswith(b"HTTP/1.1 200"):
            self.rec.error = f"GET /events: {head[:80]!r}"
            return []
        arrivals, pos = [], 0
        for at, chunk in self.rec.chunks:
            pos += len(chunk)
            arrivals.append((pos, at))
        pieces, at_index, pos = [], 0, len(head) + 4
        while (end := raw.find(b"\r\n", pos)) != -1 and (size := int(raw[pos:end], 16)):
            start, stop = end + 2, end + 2 + size
            while arrivals[at_index][0] < stop:
                at_index += 1
            pieces.append((arrivals[at_index][1], raw[start:stop]))
            pos = stop + 2
        return pieces


async def watch(server: ServerProcess, loop_id: str, rec: Recording) -> Watcher:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    request = (
        f"GET /api/v1/loops/{loop_id}/events HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {server.token}\r\nAccept: text/event-stream\r\n\r\n"
    )
    loop = asyncio.get_running_loop()
    transport, watcher = await loop.create_connection(lambda: Watcher(rec), host, int(port))
    transport.write(request.encode())
    return watcher


@dataclass
class FanOut:
    watchers: int
    deltas: int
    sender: list[tuple[float, float]]
    watched: list[list[tuple[float, float]]]
    errors: list[str]
    server_cpu: float
    client_cpu: float
    direct: list[tuple[float, float]] = field(default_factory=list)
    stalls: list[dict[str, Any]] = field(default_factory=list)
    case: str = "warm"
    received: list[tuple[float, float]] = field(default_factory=list)  # `--trace`: engine got it

    @property
    def complete(self) -> int:
        """Watchers that got exactly the sender's stamps, in the same order."""
        expected = [stamp for _, stamp in self.sender]
        return sum([stamp for _, stamp in w] == expected for w in self.watched)

    def watcher_lags(self) -> tuple[list[float], list[float]]:
        """Per (watcher, delta): arrival − stamp, and arrival − the sender's arrival."""
        sender_at = {stamp: at for at, stamp in self.sender}
        vs_stamp, vs_sender = [], []
        for watcher in self.watched:
            for at, stamp in watcher:
                vs_stamp.append(at - stamp)
                if stamp in sender_at:
                    vs_sender.append(at - sender_at[stamp])
        return vs_stamp, vs_sender


async def bench_fanout(
    server: ServerProcess,
    loop_id: str,
    watchers: int,
    deltas: int,
    spy: Path | None,
    trace: bool = False,
) -> FanOut:
    recs = [Recording() for _ in range(watchers)]
    clients: list[dict[str, Any]] = []  # the bench's own stalls (`--trace`)
    readers = await asyncio.gather(*(watch(server, loop_id, rec) for rec in recs))
    try:
        async with asyncio.timeout(OPEN_SECONDS):
            await asyncio.gather(*(rec.opened.wait() for rec in recs))
        log(f"(b) {watchers} watchers attached; sending [[stamped: {deltas}]]")
        settle_heap()  # no full collection of (a)'s garbage in the middle of the clients' reads
        client_cpu = time.process_time()
        sender, cpu = await _stamped_turn(server, loop_id, deltas, recs, spy, trace, clients)
        client_cpu = time.process_time() - client_cpu
    finally:
        for reader in readers:
            reader.transport.close()
    for rec, reader in zip(recs, readers, strict=True):
        rec.chunks = reader.body()
    errors = [rec.error for rec in [sender, *recs] if rec.error]
    watched = [rec.stamps() for rec in recs]
    fanout = FanOut(watchers, deltas, sender.stamps(), watched, errors, cpu, client_cpu)
    if fanout.sender and trace and server.home is not None:
        start, end = fanout.sender[0][1], fanout.sender[-1][0]
        fanout.stalls = sorted(
            read_stalls(server.home, start, end) + [c for c in clients if start <= c["at"] <= end],
            key=lambda entry: entry["at"],
        )
        stamps = {stamp for _, stamp in fanout.sender}
        fanout.received = [(at, st) for at, st in read_received(server.home) if st in stamps]
    return fanout


async def _stamped_turn(
    server: ServerProcess,
    loop_id: str,
    deltas: int,
    recs: list[Recording],
    spy: Path | None,
    trace: bool,
    clients: list[dict[str, Any]],
) -> tuple[Recording, float]:
    """Send the stamped turn and wait until every watcher saw its end; (sender, server CPU s)."""
    sender = Recording()
    body = {"content": f"[[stamped: {deltas}]]"}
    async with server.client() as http, py_spy(server.pid, spy):
        cpu = server.cpu_seconds()
        what = "the bench clients' event loop late"
        monitor = asyncio.create_task(watch_loop(clients.append, what)) if trace else None
        try:
            await record(http, sender, "POST", f"/loops/{loop_id}/messages", json=body)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_SECONDS):
                    await asyncio.gather(*(rec.ended.wait() for rec in recs))
        finally:
            if monitor is not None:
                monitor.cancel()
        cpu = server.cpu_seconds() - cpu
    return sender, cpu


async def direct_stamped(client: ClaudeSDKClient, deltas: int) -> list[tuple[float, float]]:
    """The same stamped turn straight through the SDK: the CLI's own share of the lag."""
    _, texts, _ = await direct_stream(client, f"[[stamped: {deltas}]]", time.time)
    return stamp_arrivals(texts)


def _lag_cells(lags: Sequence[float]) -> list[str]:
    if not lags:
        return ["—", "—"]
    return [ms(statistics.median(lags)), ms(percentile(lags, 0.99))]


BLOCK = 100  # deltas per row of the breakdown
FANOUT_CASES = {
    "warm": "a warm agent",
    "first": "the loop's first turn",
}


def block_lags(streams: Iterable[Sequence[tuple[float, float]]]) -> list[list[float]]:
    """Lag vs stamp per block of `BLOCK` deltas (by position in the turn), over all streams."""
    blocks: list[list[float]] = []
    for stream in streams:
        for index, (at, stamp) in enumerate(stream):
            while len(blocks) <= index // BLOCK:
                blocks.append([])
            blocks[index // BLOCK].append(at - stamp)
    return blocks


def render_breakdown(f: FanOut) -> str:
    """p50/p99 lag per block of 100 deltas, so a stall once per turn shows where it is."""
    watched, sender = block_lags(f.watched), block_lags([f.sender])
    received = block_lags([f.received])
    rows = []
    for number, lags in enumerate(watched):
        own = sender[number] if number < len(sender) else []
        got = _lag_cells(received[number]) if number < len(received) else []
        rows.append([f"{number * BLOCK + 1}–{number * BLOCK + BLOCK}", *_lag_cells(lags),
                     ms(max(lags)), *_lag_cells(own), *got])  # fmt: skip
    header = ["deltas", "watchers p50 (ms)", "p99", "max", "sender p50 (ms)", "p99"]
    if received:  # `--trace`: when the engine got each delta from the agent, before fan-out
        header += ["engine got it p50 (ms)", "p99"]
    text = f"Lag vs stamp per block of {BLOCK} deltas:\n\n{table(header, rows)}"
    if f.stalls:
        stamps = [stamp for _, stamp in f.sender]
        lines = [
            f"- +{(s['at'] - stamps[0]) * 1000:.0f} ms (near delta "
            f"{sum(stamp < s['at'] for stamp in stamps)}): {s['what']}, {s['ms']:.1f} ms"
            + (f" (its own CPU {s['cpu_ms']:.1f} ms)" if "cpu_ms" in s else "")
            for s in f.stalls
        ]
        text += "\n\nStalls and collections during the turn (`--trace`):\n\n"
        text += "\n".join(lines)
    return text


def render_fanout(f: FanOut) -> str:
    vs_stamp, vs_sender = f.watcher_lags()
    sender_lag = [at - stamp for at, stamp in f.sender]
    direct_lag = [at - stamp for at, stamp in f.direct]
    pairs = sum(len(w) for w in f.watched)
    target = f"p99 < {LAG_TARGET_MS:.0f} ms"

    def judge(lags: Sequence[float]) -> str:
        return verdict(bool(lags) and percentile(lags, 0.99) * 1000 < LAG_TARGET_MS)

    rows = [
        [f"{f.watchers} watchers, `GET /events`", f"{pairs} / {f.watchers * len(f.sender)}",
         *_lag_cells(vs_stamp), *_lag_cells(vs_sender), target,
         f"{judge(vs_stamp)} (stamp) / {judge(vs_sender)} (fan-out)"],
        ["sender's own `POST /messages` stream (baseline, same turn)",
         f"{len(f.sender)} / {f.deltas}", *_lag_cells(sender_lag), "0.0", "0.0", target,
         judge(sender_lag)],
        ["direct ClaudeSDKClient, no server (separate turn)",
         f"{len(f.direct)} / {f.deltas}", *_lag_cells(direct_lag), "—", "—", "", ""],
    ]  # fmt: skip
    header = [
        "stream", "deltas received", "lag vs stamp median (ms)", "p99",
        "lag vs sender arrival median (ms)", "p99", "target", "result",
    ]  # fmt: skip
    per_event = f.server_cpu / max(1, pairs + len(f.sender)) * 1e6
    notes = [
        f"- every watcher got every delta, in order: {f.complete} / {f.watchers} watchers "
        f"({verdict(f.complete == f.watchers and len(f.sender) == f.deltas)})",
        f"- server CPU during the turn: {f.server_cpu:.2f} s "
        f"(≈ {per_event:.0f} µs per delivered delta event); the bench's own CPU "
        f"(all {f.watchers + 1} clients): {f.client_cpu:.2f} s",
    ]
    if f.errors:
        notes.append(f"- stream errors: {len(f.errors)}, first: {f.errors[0]}")
    title = (
        f"### (b) Fan-out: one loop, {f.watchers} watchers, one `[[stamped: {f.deltas}]]` "
        f"turn (a delta every 2 ms), {FANOUT_CASES[f.case]}"
    )
    return f"{title}\n\n{table(header, rows)}\n\n" + "\n".join(notes) + "\n\n" + render_breakdown(f)


# ---- (c) memory per idle loop -------------------------------------------------------------


async def create_loops(http: httpx.AsyncClient, count: int) -> None:
    numbers = iter(range(count))

    async def worker() -> None:
        for number in numbers:
            await create_loop(http, f"idle {number}")

    await asyncio.gather(*(worker() for _ in range(CREATE_CONCURRENCY)))


async def page_all(http: httpx.AsyncClient) -> tuple[int, int]:
    """Page through GET /loops?limit=100 to the end: (pages, loops seen)."""
    pages, seen, after = 0, 0, None
    while True:
        params: dict[str, Any] = {"limit": PAGE_LIMIT, **({"after": after} if after else {})}
        resp = await http.get("/loops", params=params)
        resp.raise_for_status()
        body = resp.json()
        pages, seen = pages + 1, seen + len(body["data"])
        if not body["has_more"]:
            return pages, seen
        after = body["last_id"]


@dataclass
class MemoryStep:
    label: str
    rss: int
    loops: int  # loops created since "before" (0 for the baseline row)
    seconds: float = 0.0
    created: int = 0  # loops created in this step


async def bench_memory(server: ServerProcess, loops: int) -> tuple[list[MemoryStep], int]:
    """RSS before/while/after creating `loops` loops, and after paging them all."""
    async with server.client(connections=CREATE_CONCURRENCY * 2) as http:
        await create_loops(http, WARMUP_LOOPS)  # first-request costs are not per loop
        await page_all(http)
        steps = [MemoryStep(f"before (after {WARMUP_LOOPS} warm-up loops)", server.rss(), 0)]
        half = loops // 2
        for label, count, total in (("created", half, half), ("created", loops - half, loops)):
            started = time.perf_counter()
            await create_loops(http, count)
            elapsed = time.perf_counter() - started
            step = MemoryStep(f"{label} {total} loops", server.rss(), total, elapsed, count)
            steps.append(step)
            log(f"(c) {total} loops created")
        started = time.perf_counter()
        pages, seen = await page_all(http)
        elapsed = time.perf_counter() - started
        label = f"after paging `GET /loops?limit={PAGE_LIMIT}` ({pages} pages)"
        steps.append(MemoryStep(label, server.rss(), loops, elapsed))
    return steps, seen


def render_memory(steps: list[MemoryStep], seen: int, loops: int) -> str:
    before = steps[0].rss
    rows = [[steps[0].label, mib(before), "—", "—", "—", "", ""]]
    for step in steps[1:]:
        grown = step.rss - before
        per_loop = grown / step.loops
        rate = f"{step.seconds:.1f} s"
        if step.created:
            rate += f" ({step.created / step.seconds:.0f} loops/s)"
        ok = verdict(per_loop < MEMORY_TARGET_BYTES)
        rows.append([step.label, mib(step.rss), mib(grown), f"{per_loop:,.0f}", rate,
                     "< 1 MB", ok])  # fmt: skip
    marginal = (steps[2].rss - steps[1].rss) / max(1, steps[2].loops - steps[1].loops)
    header = [
        "step",
        "server RSS (MiB)",
        "Δ vs before (MiB)",
        "bytes per loop",
        "took",
        "target",
        "result",
    ]
    expected = loops + WARMUP_LOOPS
    notes = [
        f"- second half alone: {marginal:,.0f} bytes per loop",
        f"- paging saw {seen} of {expected} loops ({verdict(seen == expected)})",
    ]
    title = f"### (c) Server memory per idle loop — {loops} loops created via `POST /loops`"
    return f"{title}\n\n{table(header, rows)}\n\n" + "\n".join(notes)


# ---- the run ----------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="loopbridge-bench-") as tmp:
        root = Path(tmp)
        async with running_standin() as standin_url:
            async with (
                running_server(root / "server", standin_url, args.nagle, args.trace) as server,
                server.client() as http,
            ):
                log(f"server pid {server.pid} at {server.url}; stand-in at {standin_url}")
                if "a" in args.parts:
                    timings = await bench_latency(args.turns, http, standin_url, root)
                    print(render_latency(*timings) + "\n", flush=True)
                for case in args.cases if "b" in args.parts else []:
                    loop_id = await create_loop(http, f"bench fan-out {case}")
                    if case == "warm":
                        await server_turn(http, loop_id, "warm up")  # its agent is running
                    fanout = await bench_fanout(
                        server, loop_id, args.watchers, args.deltas, args.spy, args.trace
                    )
                    fanout.case = case
                    async with direct_agent(standin_url, root / f"direct-{case}") as direct:
                        fanout.direct = await direct_stamped(direct, args.deltas)
                    print(render_fanout(fanout) + "\n", flush=True)
            if "c" in args.parts:
                async with running_server(root / "memory", standin_url, args.nagle) as server:
                    steps, seen = await bench_memory(server, args.loops)
                    print(render_memory(steps, seen, args.loops), flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_engine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--turns", type=int, default=100, help="measured turns per path (a)")
    parser.add_argument("--watchers", type=int, default=200, help="watchers on one loop (b)")
    parser.add_argument("--deltas", type=int, default=STAMPED_DELTAS, help="stamped deltas (b)")
    parser.add_argument("--loops", type=int, default=10_000, help="idle loops to create (c)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 5 turns, 20 watchers, 500 loops"
    )
    parser.add_argument("--parts", default="abc", help="which of (a), (b), (c) to run, e.g. b")
    parser.add_argument(
        "--cases",
        type=lambda text: text.split(","),
        default=list(FANOUT_CASES),
        help="(b)'s cases: warm (the loop's agent ran a turn before), first (the turn is the "
        "loop's first: its agent starts as the watchers wait)",
    )
    parser.add_argument("--spy", type=Path, help="py-spy the server during (b) into this file")
    parser.add_argument(
        "--nagle",
        action="store_true",
        help="bind the server with plain socket.create_server() (no TCP_NODELAY), "
        "as bridge/cli/main.py and tests/conftest.py do, to show the delayed-ACK stall",
    )
    parser.add_argument(
        "--trace",
        action="store_true",
        help="log the server's garbage collections and event-loop stalls; (b) lists them",
    )
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:  # options given explicitly still win
        for name, value in QUICK.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    if min(args.turns, args.watchers, args.deltas, args.loops) < 2:
        parser.error("--turns, --watchers, --deltas and --loops must be at least 2")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.serve is not None:
        with contextlib.suppress(KeyboardInterrupt):
            # on uvloop, as `loopbridge serve` runs
            run_server(serve(args.serve, args.nagle, args.trace))
        return
    run_server(run(args))  # the clients on uvloop too: cheaper per chunk


if __name__ == "__main__":
    main()
