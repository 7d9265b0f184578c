"""Starting the Discord adapter: alone (`loopbridge discord`) or beside the server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from adapters import runner
from adapters.discord.access import invite_url
from adapters.discord.app import DiscordAdapter
from adapters.discord.incoming import PLATFORM
from adapters.discord.settings import DiscordSettings
from adapters.settings import AdapterSettingsError
from bridge.client.asgi import ASGIApp


def print_invite_url() -> None:
    """`loopbridge discord --invite-url`: the URL that adds the bot to a server."""
    try:
        print(invite_url(DiscordSettings.load()))
    except ValueError as exc:
        raise AdapterSettingsError(str(exc)) from None


async def run_discord() -> None:
    """`loopbridge discord`: the adapter alone, against the server at LOOPBRIDGE_API_URL."""
    await runner.run_alone(DiscordSettings, DiscordAdapter, PLATFORM)


async def start_embedded(
    app: ASGIApp, token: str, revoke: Callable[[], Awaitable[object]] | None = None
) -> DiscordAdapter | None:
    """See `adapters.runner.start_embedded`."""
    return await runner.start_embedded(DiscordSettings, DiscordAdapter, app, token, revoke)
