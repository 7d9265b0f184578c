"""Starting an adapter: alone (`loopbridge slack`) or inside `loopbridge serve`.

Both platforms start the same way; each gives its settings class and how to make
its adapter (`AdapterShell` subclass) from settings and a Loop API client.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from adapters.settings import AdapterSettings, standalone_client
from adapters.shell import AdapterShell
from adapters.startup import PlatformUnreachable
from bridge.client import LoopClient
from bridge.client.asgi import ASGIApp

S = TypeVar("S", bound=AdapterSettings)
A = TypeVar("A", bound=AdapterShell)
Make = Callable[[S, LoopClient], A]


async def run_alone(settings_type: type[S], make: Make[S, A], platform: str) -> None:
    """The adapter alone, against the server at LOOPBRIDGE_API_URL, until stopped."""
    settings = settings_type.load()
    settings.check()
    async with standalone_client(platform) as client:
        await make(settings, client).run_forever()


async def start_embedded(
    settings_type: type[S],
    make: Make[S, A],
    app: ASGIApp,
    token: str,
    revoke: Callable[[], Awaitable[object]] | None = None,
) -> A | None:
    """The adapter inside `loopbridge serve`, on an in-process client with `token`; None
    when the platform is not configured. When it cannot start, everything it opened is
    closed, and `revoke` (the token's revocation) is called unless the platform was only
    unreachable (the caller tries again with the same token): then the error is raised
    (AdapterSettingsError, PlatformRefused, PlatformUnreachable: see startup.py). The
    caller stops a started adapter (`await adapter.stop()`, then
    `await adapter.client.aclose()`)."""
    try:
        settings = settings_type.load()
        if not settings.configured:
            return None
        adapter = make(settings, LoopClient.in_process(app, token))
    except BaseException:
        if revoke is not None:
            await revoke()
        raise
    try:
        await adapter.start()  # which stops what it had started when it fails
    except BaseException as exc:
        await adapter.client.aclose()
        if revoke is not None and not isinstance(exc, PlatformUnreachable):
            await revoke()
        raise
    return adapter
