"""Starting the Slack adapter: alone (`loopbridge slack`) or beside the server."""

from __future__ import annotations

from pydantic import ValidationError

from adapters.settings import AdapterSettingsError, settings_error, standalone_client
from adapters.slack.app import SlackAdapter
from adapters.slack.settings import SlackSettings
from bridge.client import LoopClient
from bridge.client.asgi import ASGIApp

ENV_PREFIX = "LOOPBRIDGE_SLACK_"


def load_slack_settings() -> SlackSettings:
    try:
        return SlackSettings()
    except ValidationError as exc:
        raise settings_error(exc, ENV_PREFIX) from None


def _check(settings: SlackSettings) -> None:
    if settings.bot_token is None:
        raise AdapterSettingsError(f"set {ENV_PREFIX}BOT_TOKEN (the xoxb- bot token)")
    if settings.mode == "socket" and settings.app_token is None:
        raise AdapterSettingsError(
            f"Socket Mode needs {ENV_PREFIX}APP_TOKEN (an xapp- token with connections:write), "
            f"or set {ENV_PREFIX}MODE=http"
        )
    if settings.mode == "http" and settings.signing_secret is None:
        raise AdapterSettingsError(f"HTTP mode needs {ENV_PREFIX}SIGNING_SECRET")


async def run_slack() -> None:
    """`loopbridge slack`: the adapter alone, against the server at LOOPBRIDGE_API_URL."""
    settings = load_slack_settings()
    _check(settings)
    async with standalone_client("slack") as client:
        await SlackAdapter(settings, client).run_forever()


async def start_embedded(app: ASGIApp, token: str) -> SlackAdapter | None:
    """The adapter inside `loopbridge serve`, on an in-process client; None when Slack
    is not configured; PlatformRefused / PlatformUnreachable when Slack will not let
    it in (see adapters/startup.py). The caller stops it (`await adapter.stop()`, then
    `await adapter.client.aclose()`)."""
    settings = load_slack_settings()
    if not settings.configured:
        return None
    adapter = SlackAdapter(settings, LoopClient.in_process(app, token))
    try:
        await adapter.start()
    except BaseException:
        await adapter.client.aclose()
        raise
    return adapter
