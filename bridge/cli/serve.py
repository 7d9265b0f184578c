"""Running the server: the engine, uvicorn on a NODELAY listener, and embedded adapters."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import gc
import logging
import os
import re
import socket
import sys
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from bridge.server.app import create_app
from bridge.server.logs import setup_logging
from bridge.server.net import listen, raise_file_limit
from bridge.server.protocol import server_config
from bridge.server.tracing import setup as setup_tracing
from bridge.server.tracing import shutdown as shutdown_tracing
from core.advisory import ADAPTERS_LOCK, Leadership, clustered
from core.config import load_settings, prepare_data_dir
from core.database_url import check_database_url
from core.engine import Engine, bundled_cli
from core.errors import SettingsError

log = logging.getLogger(__name__)

PLATFORMS = ("slack", "discord")
# A replica waiting to run the embedded adapters asks this often; one running them checks
# its lock's connection this often (a takeover after a crash takes about the former).
LEADER_POLL_SECONDS = 2.0
LEADER_CHECK_SECONDS = 5.0
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
    setup_logging(settings.log_format)
    prepare_data_dir(settings)
    check_database_url(settings.resolved_database_url)
    cli = settings.cli_path or bundled_cli()
    if not cli.is_file():
        raise SettingsError(
            f"the agent CLI is missing at {cli}: "
            "reinstall claude-agent-sdk or set LOOPBRIDGE_CLI_PATH"
        )
    raise_file_limit()
    listener = _listen(host, port)
    if settings.internal_url is None:  # [ext] how the other replicas reach this one
        settings.internal_url = _internal_url(host, listener.getsockname()[1])
    engine = Engine(settings)
    try:
        await engine.start()
    except SettingsError:
        raise
    except Exception as exc:
        raise SettingsError(f"cannot start the engine: {type(exc).__name__}: {exc}") from None
    app = create_app(engine, manage_engine=False)
    traces = setup_tracing()
    adapters: list[_Embedded] = []
    leading: asyncio.Task[None] | None = None
    try:
        if clustered(engine.db.engine) and _adapters_configured():
            leading = asyncio.create_task(_lead_adapters(engine, app))
        else:
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
        if leading is not None:
            leading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await leading
        await _stop_adapters(engine, adapters)
        await engine.close()
        if traces is not None:
            await shutdown_tracing(traces)  # after the engine, so the turns it ended are sent


@dataclass
class _Embedded:
    """An adapter inside the server: running, or still trying to reach its platform."""

    platform: str
    token_id: str
    adapter: Any = None
    retrying: asyncio.Task[None] | None = None

    def report(self, line: str) -> None:
        print(f"loopbridge: the {self.platform} adapter: {line}", file=sys.stderr, flush=True)

    def running(self, adapter: Any) -> None:
        self.adapter = adapter
        print(f"loopbridge: the {self.platform} adapter is running", flush=True)

    def retry(self, start: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        from adapters.startup import start_with_retries

        async def keep_trying() -> None:
            adapter = await start_with_retries(start, self.report, first_delay=2.0)
            if adapter is not None:
                self.running(adapter)

        self.retrying = asyncio.create_task(keep_trying())

    async def stop(self) -> None:
        if self.retrying is not None:
            self.retrying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.retrying
        if self.adapter is not None:
            with contextlib.suppress(Exception):
                await self.adapter.stop()
                await self.adapter.client.aclose()


async def _start_adapters(engine: Engine, app: Any) -> list[_Embedded]:
    """The Slack and Discord adapters whose settings are present, on in-process clients.

    Each gets a token of its own user (`slack`, `discord`) for this run, revoked at stop.
    A platform that refuses the adapter leaves it off, one that cannot be reached is
    tried again with backoff: either way the API serves (see adapters/startup.py).
    """
    from adapters.discord.runner import start_embedded as start_discord
    from adapters.settings import AdapterSettingsError
    from adapters.slack.runner import start_embedded as start_slack
    from adapters.startup import PlatformRefused, PlatformUnreachable

    await revoke_orphaned_tokens(engine)
    me = os.getpid()
    label = f"{EMBEDDED_LABEL} (pid {me} started {_started(me)} on {socket.gethostname()})"
    started: list[_Embedded] = []
    for platform, start_on in (("slack", start_slack), ("discord", start_discord)):
        await engine.accounts.ensure_user(platform)
        info, token = await engine.accounts.create_token(platform, label)
        embedded = _Embedded(platform, info.token_id)
        # A start that fails for good revokes the token at once (adapters/runner.py).
        revoke = functools.partial(engine.accounts.revoke_token, info.token_id)
        start = functools.partial(start_on, app, token, revoke)
        try:
            adapter = await start()
        except AdapterSettingsError as exc:
            raise SettingsError(str(exc)) from None
        except PlatformRefused as exc:
            embedded.report(f"{exc}; it stays off (fix the setting and restart)")
        except PlatformUnreachable as exc:
            embedded.report(f"{exc}; trying again in the background")
            embedded.retry(start)
        else:
            if adapter is None:
                await engine.accounts.revoke_token(info.token_id)
                continue
            embedded.running(adapter)
        started.append(embedded)
    return started


async def _stop_adapters(engine: Engine, adapters: list[_Embedded]) -> None:
    for embedded in adapters:
        await embedded.stop()
        await engine.accounts.revoke_token(embedded.token_id)


def _adapters_configured() -> bool:
    """Whether any embedded adapter has its settings (a wrong one stops `serve` here)."""
    from adapters.discord.settings import DiscordSettings
    from adapters.settings import AdapterSettingsError
    from adapters.slack.settings import SlackSettings

    try:
        return SlackSettings.load().configured or DiscordSettings.load().configured
    except AdapterSettingsError as exc:
        raise SettingsError(str(exc)) from None


async def _lead_adapters(engine: Engine, app: Any) -> None:
    """With replicas (PostgreSQL), the embedded adapters run on one replica at a time,
    the holder of an advisory lock (core/advisory.py); the others ask for it every few
    seconds and the first to get it once its holder dies or stops starts them."""
    leadership = Leadership(engine.db.engine, ADAPTERS_LOCK, "the embedded chat adapters")
    try:
        while True:
            await leadership.acquire(LEADER_POLL_SECONDS, _waiting_to_lead)
            adapters: list[_Embedded] = []
            failed = False
            try:
                adapters = await _start_adapters(engine, app)
                await leadership.lost(every=LEADER_CHECK_SECONDS)
            except Exception:  # a bug: let another replica try them
                log.exception("the embedded chat adapters failed on this replica")
                failed = True
            finally:
                await _stop_adapters(engine, adapters)
            if failed:
                await leadership.release()
                await asyncio.sleep(LEADER_POLL_SECONDS)
    finally:
        await leadership.release()


def _waiting_to_lead() -> None:
    print(
        "loopbridge: the chat adapters run on another replica; this one takes over "
        "when that one stops",
        flush=True,
    )


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


def _internal_url(host: str, port: int) -> str:
    """This server's URL for the other replicas: its listening address, or its host name
    when it listens on every address."""
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _listen(host: str, port: int) -> Any:
    try:
        return listen(host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(f"port {port} is in use: choose another with --port") from None
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
