"""Running the server: the engine, uvicorn on a NODELAY listener, and embedded adapters."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import re
import socket
from collections.abc import Callable, Coroutine, Generator
from pathlib import Path
from typing import Any, Protocol

import uvicorn

from bridge.net import listen, raise_file_limit
from bridge.protocol import server_config
from bridge.server import create_app
from core.config import load_settings
from core.engine import Engine, bundled_cli
from core.errors import SettingsError

log = logging.getLogger(__name__)

PLATFORMS = ("slack", "discord")
# An embedded adapter's token names the process that made it (its pid and start time, as
# pids are reused), so a later start can tell whether that process is gone.
EMBEDDED_LABEL = "embedded adapter"
EMBEDDED_OWNER = re.compile(r"embedded adapter \(pid (\d+) started (\d+) on (.+)\)")


def run(work: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed (it comes with uvicorn[standard])."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(work)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(work)


def settle_heap() -> None:
    """Take what start-up made (~170k long-lived objects of the engine, FastAPI and
    SQLAlchemy) out of the collector's sight: each full collection then pauses every
    stream for ~10 ms instead of ~120 ms."""
    gc.collect()
    gc.freeze()


class ServeError(Exception):
    """The server cannot start; the message says what to fix."""


class Adapter(Protocol):
    async def stop(self) -> None: ...


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM/SIGINT once it has stopped, which would end the process
    before the engine closes its turns and sandboxes; here the caller's cleanup runs first.
    `ready` is called once the server takes connections and signals (not before, so a
    SIGTERM right after the "serving" line still stops it cleanly)."""

    def __init__(self, config: uvicorn.Config, ready: Callable[[], None]) -> None:
        super().__init__(config)
        self._ready = ready

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            self._ready()


async def serve(host: str, port: int, on_ready: Callable[[int], None] | None = None) -> None:
    settings = load_settings()
    cli = settings.cli_path or bundled_cli()
    if not cli.is_file():
        raise SettingsError(
            f"the agent CLI is missing at {cli}: "
            "reinstall claude-agent-sdk or set LOOPBRIDGE_CLI_PATH"
        )
    raise_file_limit()
    listener = _listen(host, port)
    engine = Engine(settings)
    try:
        await engine.start()
    except SettingsError:
        raise
    except Exception as exc:
        raise SettingsError(f"cannot start the engine: {type(exc).__name__}: {exc}") from None
    app = create_app(engine, manage_engine=False)
    adapters: list[tuple[Adapter, Any, str]] = []
    try:
        adapters = await _start_adapters(engine, app)
        bound = listener.getsockname()[1]

        def ready() -> None:
            print(f"loopbridge serving the Loop API on http://{host}:{bound}/api/v1", flush=True)
            if on_ready is not None:
                on_ready(bound)

        server = _Server(server_config(app, settings), ready)
        settle_heap()
        await server.serve(sockets=[listener])
    finally:
        for adapter, client, token_id in adapters:
            with contextlib.suppress(Exception):
                await adapter.stop()
                await client.aclose()
            await engine.accounts.revoke_token(token_id)
        await engine.close()


async def _start_adapters(engine: Engine, app: Any) -> list[tuple[Adapter, Any, str]]:
    """The Slack and Discord adapters whose settings are present, on in-process clients.

    Each gets a token of its own user (`slack`, `discord`) for this run, revoked at stop.
    """
    from adapters.discord.runner import start_embedded as start_discord
    from adapters.settings import AdapterSettingsError
    from adapters.slack.runner import start_embedded as start_slack

    await revoke_orphaned_tokens(engine)
    me = os.getpid()
    label = f"{EMBEDDED_LABEL} (pid {me} started {_started(me)} on {socket.gethostname()})"
    started: list[tuple[Adapter, Any, str]] = []
    for platform, start in (("slack", start_slack), ("discord", start_discord)):
        await engine.accounts.ensure_user(platform)
        info, token = await engine.accounts.create_token(platform, label)
        try:
            adapter = await start(app, token)
        except AdapterSettingsError as exc:
            raise SettingsError(str(exc)) from None
        if adapter is None:
            await engine.accounts.revoke_token(info.token_id)
            continue
        print(f"loopbridge: the {platform} adapter is running", flush=True)
        started.append((adapter, adapter.client, info.token_id))
    return started


async def revoke_orphaned_tokens(engine: Engine) -> None:
    """Revoke the embedded adapters' tokens of servers on this host that died without
    revoking them (a clean stop does); another host's are left to that host."""
    here = socket.gethostname()
    for platform in PLATFORMS:
        for info in await engine.accounts.list_tokens(platform):
            if not info.label.startswith(EMBEDDED_LABEL):
                continue
            owner = EMBEDDED_OWNER.fullmatch(info.label)
            if owner is None or (owner[3] == here and _started(int(owner[1])) != owner[2]):
                await engine.accounts.revoke_token(info.token_id)
                log.warning("revoked %s's token %s of a server that died", platform, info.token_id)


def _started(pid: int) -> str:
    """When the process started, in clock ticks since boot ("" when there is no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name before ")" may hold spaces


def _listen(host: str, port: int) -> Any:
    try:
        return listen(host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(f"port {port} is in use: choose another with --port") from None
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
