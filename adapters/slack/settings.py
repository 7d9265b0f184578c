"""Slack settings: `LOOPBRIDGE_SLACK_*` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from adapters.policy import Policy
from adapters.settings import IdList
from bridge.contract.models import PermissionMode

# Room left under Slack's 3,000-character section limit, which Slack may count
# in UTF-16 units; parts are measured in UTF-8 bytes, never fewer than those.
DEFAULT_PART_LIMIT = 2900


class SlackSettings(BaseSettings):
    """Socket Mode needs `app_token` (xapp-…) and `bot_token` (xoxb-…); HTTP mode needs
    `bot_token` and `signing_secret`."""

    model_config = SettingsConfigDict(env_prefix="LOOPBRIDGE_SLACK_", extra="ignore")

    bot_token: SecretStr | None = None
    app_token: SecretStr | None = None
    signing_secret: SecretStr | None = None
    mode: Literal["socket", "http"] = "socket"
    # The Web API base URL, e.g. http://127.0.0.1:9000/api/ for a fake or a proxy.
    api_url: str | None = None
    http_host: str = "0.0.0.0"
    http_port: int = Field(3000, ge=0, le=65535)
    http_path: str = "/slack/events"
    # "native" streams with chat.startStream/appendStream/stopStream where Slack allows
    # it and falls back to edits; "edit" always posts and edits.
    streaming: Literal["native", "edit"] = "native"
    edit_interval: float = Field(1.0, ge=0.2)
    part_limit: int = Field(DEFAULT_PART_LIMIT, ge=200, le=3000)
    # Who may do what (empty: everyone). Ids are Slack user or channel ids.
    channels: IdList = Field(default_factory=list)
    users: IdList = Field(default_factory=list)
    admins: IdList = Field(default_factory=list)
    approvers: IdList = Field(default_factory=list)
    permission_mode: PermissionMode | None = None
    # The largest file the agent shares that is posted to a thread (Slack takes up to
    # 1 GB; the adapter holds one in memory while posting it).
    file_limit: int = Field(100 * 1024 * 1024, ge=1)

    @property
    def configured(self) -> bool:
        """Enough is set to connect (what `loopbridge serve` may check)."""
        if self.bot_token is None:
            return False
        if self.mode == "socket":
            return self.app_token is not None
        return self.signing_secret is not None

    def policy(self) -> Policy:
        return Policy(
            channels=self.channels, users=self.users, admins=self.admins, approvers=self.approvers
        )
