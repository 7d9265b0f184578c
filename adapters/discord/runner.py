"""Starting the Discord adapter: alone (`loopbridge discord`) or beside the server."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import aiohttp
import discord
from pydantic import ValidationError

from adapters.discord.access import invite_url
from adapters.discord.app import DiscordAdapter
from adapters.discord.settings import DiscordSettings
from adapters.settings import AdapterSettingsError, settings_error, standalone_client
from adapters.startup import PlatformRefused, PlatformUnreachable, unreachable
from bridge.client import LoopClient
from bridge.client.asgi import ASGIApp

ENV_PREFIX = "LOOPBRIDGE_DISCORD_"


def load_discord_settings() -> DiscordSettings:
    try:
        return DiscordSettings()
    except ValidationError as exc:
        raise settings_error(exc, ENV_PREFIX) from None


def print_invite_url() -> None:
    """`loopbridge discord --invite-url`: the URL that adds the bot to a server."""
    try:
        print(invite_url(load_discord_settings()))
    except ValueError as exc:
        raise AdapterSettingsError(str(exc)) from None


async def run_discord() -> None:
    """`loopbridge discord`: the adapter alone, against the server at LOOPBRIDGE_API_URL."""
    settings = load_discord_settings()
    if settings.token is None:
        raise AdapterSettingsError(f"set {ENV_PREFIX}TOKEN (the bot token, Developer Portal → Bot)")
    async with standalone_client("discord") as client:
        with _refusals():
            await DiscordAdapter(settings, client).run_forever()


async def start_embedded(app: ASGIApp, token: str) -> DiscordAdapter | None:
    """The adapter inside `loopbridge serve`, on an in-process client; None when Discord
    is not configured; PlatformRefused / PlatformUnreachable when Discord will not let
    it in (see adapters/startup.py). The caller stops it (`await adapter.stop()`, then
    `await adapter.client.aclose()`)."""
    settings = load_discord_settings()
    if not settings.configured:
        return None
    adapter = DiscordAdapter(settings, LoopClient.in_process(app, token))
    try:
        with _refusals():
            await adapter.start()
    except BaseException:
        await adapter.stop()
        await adapter.client.aclose()
        raise
    return adapter


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """Discord refusing to let the bot in, or not answering, said in one line."""
    try:
        yield
    except discord.LoginFailure as exc:
        raise PlatformRefused(f"Discord refused {ENV_PREFIX}TOKEN: {exc}") from None
    except discord.PrivilegedIntentsRequired:
        raise PlatformRefused(
            "Discord refused the bot's intents: switch on the Message Content intent "
            "(Developer Portal → Bot → Privileged Gateway Intents)"
        ) from None
    except discord.DiscordServerError as exc:
        raise PlatformUnreachable(f"Discord answered {exc.status}: {exc.text}") from None
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise unreachable("Discord", discord.http.Route.BASE, exc) from None
