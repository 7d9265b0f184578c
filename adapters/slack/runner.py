"""Starting the Slack adapter: alone (`loopbridge slack`) or beside the server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from adapters import runner
from adapters.slack.app import PLATFORM, SlackAdapter
from adapters.slack.settings import SlackSettings
from bridge.client.asgi import ASGIApp


async def run_slack() -> None:
    """`loopbridge slack`: the adapter alone, against the server at LOOPBRIDGE_API_URL."""
    await runner.run_alone(SlackSettings, SlackAdapter, PLATFORM)


async def start_embedded(
    app: ASGIApp, token: str, revoke: Callable[[], Awaitable[object]] | None = None
) -> SlackAdapter | None:
    """See `adapters.runner.start_embedded`."""
    return await runner.start_embedded(SlackSettings, SlackAdapter, app, token, revoke)
