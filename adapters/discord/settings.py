"""Discord settings: `LOOPBRIDGE_DISCORD_*` environment variables."""

from __future__ import annotations

from typing import Any, Literal, cast

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from adapters.settings import AdapterSettings, IdList

# Discord's limit on a message's content.
CONTENT_LIMIT = 2000
# The auto-archive durations Discord offers a thread.
ARCHIVE_MINUTES = (60, 1440, 4320, 10080)
ArchiveMinutes = Literal[60, 1440, 4320, 10080]


class DiscordSettings(AdapterSettings):
    """`token` is the bot token of the application (Developer Portal → Bot)."""

    model_config = SettingsConfigDict(env_prefix="LOOPBRIDGE_DISCORD_", extra="ignore")

    token: SecretStr | None = None
    # `api_url` is the REST base with its version, e.g. http://127.0.0.1:9000/api/v10 (a
    # fake, or the REST proxy a large bot runs); `gateway_url` the gateway's websocket URL.
    # Both are class attributes of discord.py, so they hold for every Discord client in
    # the process.
    gateway_url: str | None = None
    # For the invite URL; by default read from the token (a bot's user id is its app's id).
    application_id: str | None = None
    # Channels bound whole to one loop each: every message there goes to it, no mention.
    bound_channels: IdList = Field(default_factory=list)
    # Guilds to register the slash commands in (at once); empty registers them globally
    # (Discord may take up to an hour to show global commands).
    command_guilds: IdList = Field(default_factory=list)
    sync_commands: bool = True
    # What one message of the answer holds.
    part_limit: int = Field(CONTENT_LIMIT, ge=200, le=CONTENT_LIMIT)
    # What Discord allows per channel: `budget` posts, and `budget` edits, per `window` s
    # (the adapter keeps one of each in hand, see pacing.py).
    budget: int = Field(5, ge=2)
    window: float = Field(5.0, gt=0)
    # When a turn ends with more parts of its answer waiting than the budget lets through
    # at once (a long answer that came all at once takes ~1 s a part), the rest goes as
    # one `answer.md` file; false: always as messages, however long that takes.
    attach_rest: bool = True
    # Minutes without activity after which Discord hides a thread: 60, 1440, 4320 or 10080.
    thread_archive_minutes: int = 1440
    # A question of at most this many short options gets a button each, else a select
    # menu (Discord fits 5 buttons in a row; 0 always uses a menu).
    option_buttons: int = Field(5, ge=0, le=5)
    # How long discord.py waits for the guilds of READY before it calls itself ready.
    guild_ready_timeout: float = Field(2.0, ge=0)
    # (Who may do what: ids are Discord user or role ids; `channels` are the channels where
    # loops may be started, a thread counting as its parent channel.)

    @field_validator("token", "api_url", "gateway_url", "application_id", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        # `LOOPBRIDGE_DISCORD_TOKEN=` in a shell or an env file means "not set".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("thread_archive_minutes")
    @classmethod
    def _archive_choices(cls, value: int) -> int:
        if value not in ARCHIVE_MINUTES:
            raise ValueError(f"must be one of {', '.join(map(str, ARCHIVE_MINUTES))}")
        return value

    @property
    def archive_duration(self) -> ArchiveMinutes:
        return cast(ArchiveMinutes, self.thread_archive_minutes)  # checked above

    def missing(self) -> str | None:
        if self.token is None:
            return f"set {self.env_prefix()}TOKEN (the bot token, Developer Portal → Bot)"
        return None
