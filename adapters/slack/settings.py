"""Slack settings: `LOOPBRIDGE_SLACK_*` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from adapters.settings import AdapterSettings

# What one message of the answer holds, in UTF-8 bytes of Markdown (Slack counts
# characters, some as two; bytes are never fewer). The `markdown` block and a stream's
# `markdown_text` take 12,000 characters; the rest leaves room for the message's other
# blocks (tool activity, status) under Slack's cap on a whole message's blocks.
MARKDOWN_LIMIT = 12_000
DEFAULT_PART_LIMIT = 11_000


class SlackSettings(AdapterSettings):
    """Socket Mode needs `app_token` (xapp-…) and `bot_token` (xoxb-…); HTTP mode needs
    `bot_token` and `signing_secret`. `api_url` is the Web API base URL, e.g.
    http://127.0.0.1:9000/api/ for a fake or a proxy."""

    model_config = SettingsConfigDict(env_prefix="LOOPBRIDGE_SLACK_", extra="ignore")

    bot_token: SecretStr | None = None
    app_token: SecretStr | None = None
    signing_secret: SecretStr | None = None
    mode: Literal["socket", "http"] = "socket"
    http_host: str = "0.0.0.0"
    http_port: int = Field(3000, ge=0, le=65535)
    http_path: str = "/slack/events"
    # "native" streams with chat.startStream/appendStream/stopStream where Slack allows
    # it and falls back to edits; "edit" always posts and edits.
    streaming: Literal["native", "edit"] = "native"
    part_limit: int = Field(DEFAULT_PART_LIMIT, ge=200, le=MARKDOWN_LIMIT)
    # The largest file the agent shares that is posted to a thread (Slack takes up to
    # 1 GB; the adapter holds one in memory while posting it).
    file_limit: int = Field(100 * 1024 * 1024, ge=1)

    def missing(self) -> str | None:
        prefix = self.env_prefix()
        if self.bot_token is None:
            return f"set {prefix}BOT_TOKEN (the xoxb- bot token)"
        if self.mode == "socket" and self.app_token is None:
            return (
                f"Socket Mode needs {prefix}APP_TOKEN (an xapp- token with connections:write), "
                f"or set {prefix}MODE=http"
            )
        if self.mode == "http" and self.signing_secret is None:
            return f"HTTP mode needs {prefix}SIGNING_SECRET"
        return None
