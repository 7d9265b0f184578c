"""Settings every adapter shares: where the Loop API is, and id lists from the environment."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, SecretStr, ValidationError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bridge.client import LoopClient


def _id_list(value: Any) -> Any:
    """`U1,U2` or `U1 U2` (or a JSON list) from an environment variable."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [part for part in text.replace(",", " ").split() if part]
    return value


IdList = Annotated[list[str], NoDecode, BeforeValidator(_id_list)]


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
