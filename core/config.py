"""Settings: `LOOPBRIDGE_*` environment variables plus an optional TOML file.

The TOML file (path in `LOOPBRIDGE_CONFIG`) is where profiles, vaults and repos
live; environment variables win over the file for the scalar settings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from core.errors import SettingsError

PermissionMode = Literal["default", "acceptEdits", "bypassPermissions", "plan", "dontAsk", "auto"]
PERMISSION_MODES: tuple[str, ...] = PermissionMode.__args__


class Profile(BaseModel):
    """How the agent of a loop behaves: prompt addition, tools, model."""

    model_config = ConfigDict(extra="forbid")
    system_prompt: str = ""
    allowed_tools: list[str] = Field(default_factory=list)
    disallowed_tools: list[str] = Field(default_factory=list)
    model: str | None = None


class Vault(BaseModel):
    """Environment variables handed to the agents of loops that choose this vault."""

    model_config = ConfigDict(extra="forbid")
    env: dict[str, str] = Field(default_factory=dict)


class Repo(BaseModel):
    """A repository a loop's working directory starts as a clone of."""

    model_config = ConfigDict(extra="forbid")
    url: str


class Budgets(BaseModel):
    """Spending caps in US dollars (UTC days and calendar months); None: no cap."""

    model_config = ConfigDict(extra="forbid")
    author_daily_usd: float | None = Field(None, ge=0)
    author_monthly_usd: float | None = Field(None, ge=0)
    user_daily_usd: float | None = Field(None, ge=0)
    user_monthly_usd: float | None = Field(None, ge=0)
    loop_usd: float | None = Field(None, ge=0)

    @property
    def any(self) -> bool:
        return any(value is not None for value in self.model_dump().values())


class Settings(BaseSettings):
    # `__` reaches into tables: LOOPBRIDGE_BUDGETS__AUTHOR_DAILY_USD=5.
    model_config = SettingsConfigDict(
        env_prefix="LOOPBRIDGE_", extra="forbid", env_nested_delimiter="__"
    )

    home: Path = Path("~/.loopbridge")
    config: Path | None = None
    database_url: str | None = None
    sandbox: Literal["local", "podman", "auto"] = "auto"
    podman_url: str | None = None
    sandbox_image: str = "localhost/loopbridge-sandbox:latest"
    sandbox_memory: str = "2g"
    sandbox_cpus: float = Field(2.0, gt=0)
    sandbox_pids: int = Field(512, ge=16)
    sandbox_network: Literal["host", "none", "model"] = "model"
    default_permission_mode: PermissionMode = "default"
    agent_idle_seconds: float = Field(600.0, gt=0)
    sandbox_idle_seconds: float = Field(1800.0, gt=0)
    rate_limit_per_minute: int = Field(1200, ge=1)
    cli_path: Path | None = None
    profiles: dict[str, Profile] = Field(default_factory=dict)
    vaults: dict[str, Vault] = Field(default_factory=dict)
    repos: dict[str, Repo] = Field(default_factory=dict)
    budgets: Budgets = Field(default_factory=Budgets)
    metrics: bool = True
    metrics_token: SecretStr | None = None
    log_format: Literal["text", "json"] = "text"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = os.environ.get("LOOPBRIDGE_CONFIG")
        if toml_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_path)))
        return tuple(sources)

    @property
    def data_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'loopbridge.db'}"

    def vault(self, name: str) -> Vault | None:
        if name == "default" and name not in self.vaults:
            return Vault()
        return self.vaults.get(name)


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning any mistake into one line that says what to fix."""
    toml_path = os.environ.get("LOOPBRIDGE_CONFIG")
    if toml_path and not Path(toml_path).is_file():
        raise SettingsError(f"LOOPBRIDGE_CONFIG names {toml_path}, which is not a readable file")
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        raise SettingsError(f"bad setting {where}: {first['msg']}") from None
    except ValueError as exc:
        raise SettingsError(f"cannot read the settings file {toml_path}: {exc}") from None
