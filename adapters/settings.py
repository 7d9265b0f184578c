"""Settings every adapter shares: the base class of a platform's settings, where the
Loop API is, and id lists from the environment."""

from __future__ import annotations

import json
from typing import Annotated, Any, Self

from pydantic import BeforeValidator, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from adapters.policy import Policy
from bridge.client import LoopClient
from bridge.contract.models import PermissionMode


def _id_list(value: Any) -> Any:
    """`U1,U2` or `U1 U2` (or a JSON list) from an environment variable."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part for part in text.replace(",", " ").split() if part]
    return value


IdList = Annotated[list[str], NoDecode, BeforeValidator(_id_list)]


class AdapterSettings(BaseSettings):
    """What every platform's settings hold; a subclass names its `env_prefix`
    (`LOOPBRIDGE_SLACK_`) and adds what is its own."""

    model_config = SettingsConfigDict(extra="ignore")

    # The platform's API base URL (a fake, or a proxy); None: the platform's own.
    api_url: str | None = None
    # Seconds between two edits of one message.
    edit_interval: float = Field(1.0, ge=0.2)
    # Who may do what (empty: everyone); ids are the platform's user, role or channel ids.
    channels: IdList = Field(default_factory=list)
    users: IdList = Field(default_factory=list)
    admins: IdList = Field(default_factory=list)
    approvers: IdList = Field(default_factory=list)
    permission_mode: PermissionMode | None = None

    @classmethod
    def env_prefix(cls) -> str:
        return str(cls.model_config.get("env_prefix", ""))

    @classmethod
    def load(cls) -> Self:
        """From the environment; AdapterSettingsError (one line) when a value is wrong."""
        try:
            return cls()
        except ValidationError as exc:
            raise settings_error(exc, cls.env_prefix()) from None

    @property
    def configured(self) -> bool:
        """Enough is set to connect (what `loopbridge serve` may check)."""
        return self.missing() is None

    def missing(self) -> str | None:
        """What to set before the adapter can connect, in one line; None: nothing."""
        raise NotImplementedError

    def check(self) -> None:
        """AdapterSettingsError when something needed is not set."""
        missing = self.missing()
        if missing is not None:
            raise AdapterSettingsError(missing)

    def policy(self) -> Policy:
        return Policy(
            channels=self.channels, users=self.users, admins=self.admins, approvers=self.approvers
        )


class ApiSettings(BaseSettings):
    """`LOOPBRIDGE_API_URL` and `LOOPBRIDGE_API_TOKEN`: the server an adapter runs against
    when it runs alone (`loopbridge slack`), as a user of the Loop API like any bot."""

    model_config = SettingsConfigDict(env_prefix="LOOPBRIDGE_", extra="ignore")

    api_url: str | None = None
    api_token: SecretStr | None = None


class LinkSettings(BaseSettings):
    """`LOOPBRIDGE_PUBLIC_URL`: set, the first reply of a loop links to its page."""

    model_config = SettingsConfigDict(env_prefix="LOOPBRIDGE_", extra="ignore")

    public_url: str | None = None


def view_links_wanted() -> bool:
    try:
        return bool(LinkSettings().public_url)
    except ValidationError:
        return False


class AdapterSettingsError(Exception):
    """A setting is missing or wrong; the message says which and how to fix it."""


def settings_error(exc: Exception, prefix: str) -> AdapterSettingsError:
    """One line out of a pydantic ValidationError (or any other mistake)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(part) for part in first["loc"]).upper()
        return AdapterSettingsError(f"bad setting {prefix}{where}: {first['msg']}")
    return AdapterSettingsError(str(exc))


def standalone_client(platform: str) -> LoopClient:
    """The Loop API client of an adapter running alone (`loopbridge slack`, `… discord`)."""
    try:
        api = ApiSettings()
    except ValidationError as exc:
        raise settings_error(exc, "LOOPBRIDGE_") from None
    if not api.api_url or api.api_token is None:
        raise AdapterSettingsError(
            "set LOOPBRIDGE_API_URL (e.g. http://127.0.0.1:8642) and LOOPBRIDGE_API_TOKEN "
            f"(`loopbridge tokens create --user {platform}`)"
        )
    return LoopClient(api.api_url, api.api_token.get_secret_value())
