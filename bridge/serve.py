"""Running the server: the engine, uvicorn on a NODELAY listener, and embedded adapters."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Protocol

import uvicorn

from bridge.logs import setup_logging
from bridge.net import listen
from bridge.server import create_app
from core.config import load_settings
from core.engine import Engine, bundled_cli
from core.errors import SettingsError

log = logging.getLogger(__name__)


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
    before the engine closes its turns and sandboxes; here the caller's cleanup runs first."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()


async def serve(host: str, port: int, on_ready: Callable[[int], None] | None = None) -> None:
    settings = load_settings()
    setup_logging(settings.log_format)
    cli = settings.cli_path or bundled_cli()
    if not cli.is_file():
        raise SettingsError(
            f"the agent CLI is missing at {cli}: "
            "reinstall claude-agent-sdk or set LOOPBRIDGE_CLI_PATH"
        )
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
        server = _Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        settle_heap()
        bound = listener.getsockname()[1]
        print(f"loopbridge serving the Loop API on http://{host}:{bound}/api/v1", flush=True)
        if on_ready is not None:
            on_ready(bound)
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

    started: list[tuple[Adapter, Any, str]] = []
    for platform, start in (("slack", start_slack), ("discord", start_discord)):
        await engine.accounts.ensure_user(platform)
        info, token = await engine.accounts.create_token(platform, "embedded adapter")
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


def _listen(host: str, port: int) -> Any:
    try:
        return listen(host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(f"port {port} is in use: choose another with --port") from None
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
