"""Settings: `LOOPBRIDGE_*` environment variables plus an optional TOML file.

The TOML file (path in `LOOPBRIDGE_CONFIG`) is where profiles, vaults and repos
live; environment variables win over the file for the scalar settings.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from bridge.contract.models import PermissionMode
from core.errors import EngineError, SettingsError

PERMISSION_MODES: tuple[str, ...] = get_args(PermissionMode)
MiB = 1024 * 1024
ENV_PREFIX = "LOOPBRIDGE_"


class Restricted(BaseModel):
    """A named setting that may be limited to some API users (`users = ["alice"]`)."""

    model_config = ConfigDict(extra="forbid")
    # None: everyone may use it.
    users: list[str] | None = None

    def allows(self, user: str) -> bool:
        return self.users is None or user in self.users


class Profile(Restricted):
    """How the agent of a loop behaves: prompt addition, tools, model."""

    system_prompt: str = ""
    allowed_tools: list[str] = Field(default_factory=list)
    disallowed_tools: list[str] = Field(default_factory=list)
    model: str | None = None


class Vault(Restricted):
    """Environment variables handed to the agents of loops that choose this vault."""

    env: dict[str, str] = Field(default_factory=dict)


class Repo(Restricted):
    """A repository a loop's working directory starts as a clone of."""

    url: str
    # Checked out after the clone (the remote's default when unset); a loop's own
    # branch is made from it.
    branch: str | None = None


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
    sandbox: Literal["local", "bubblewrap", "podman", "auto"] = "auto"
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
    # Where people reach the server (view links point there); else the request's own URL.
    public_url: str | None = None
    view_link_days: float = Field(7.0, gt=0, le=365)
    cli_path: Path | None = None
    # Limits that hold under abuse (see docs/security.md).
    max_agents: int = Field(32, ge=1)
    max_agents_per_user: int = Field(16, ge=1)
    max_queued_per_user: int = Field(100, ge=1)
    max_queued_bytes_per_user: int = Field(32 * MiB, ge=1)
    max_connections: int = Field(1000, ge=1)
    http_header_timeout: float = Field(10.0, gt=0)
    http_body_timeout: float = Field(60.0, gt=0)
    login_failures_per_name: int = Field(5, ge=1)  # a minute, then 429
    login_failures_per_address: int = Field(20, ge=1)
    # Which replica this process is among several on one PostgreSQL database (docs/cluster.md,
    # docs/deploy.md).
    replica_id: str = Field(default_factory=socket.gethostname)  # LOOPBRIDGE_REPLICA_ID
    # Agents cold-starting at once on this replica; more wait their turn (a burst of
    # starts is what saturates a machine first).
    max_starting: int = Field(default_factory=lambda: 2 * (os.cpu_count() or 1), ge=1)
    profiles: dict[str, Profile] = Field(default_factory=dict)
    vaults: dict[str, Vault] = Field(default_factory=dict)
    repos: dict[str, Repo] = Field(default_factory=dict)
    budgets: Budgets = Field(default_factory=Budgets)
    # Chat adapters' defaults per channel (`[routes.slack.C123]`); read by adapters/routing.py.
    routes: dict[str, dict[str, dict[str, object]]] = Field(default_factory=dict)
    metrics: bool = True
    metrics_token: SecretStr | None = None
    log_format: Literal["text", "json"] = "text"
    # [ext] The URL the other replicas reach this one at (docs/deploy.md; serve derives it
    # from its listener when unset).
    internal_url: str | None = None  # LOOPBRIDGE_INTERNAL_URL

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

    def known(self, kind: str, user: str) -> list[str]:
        """The names of one kind (profile, vault, repo) that `user` may choose."""
        table: dict[str, Restricted]
        if kind == "profile":
            table = dict(self.profiles)
        elif kind == "vault":
            table = {"default": Vault(), **self.vaults}
        else:
            table = dict(self.repos)
        return sorted(name for name, setting in table.items() if setting.allows(user))

    def check_access(self, user: str, profiles: list[str], vault: str, repo: str | None) -> None:
        """Refuse names the settings do not know (400) or keep for other users (403)."""
        chosen: list[tuple[str, str, Restricted | None]] = [
            *(("profile", name, self.profiles.get(name)) for name in profiles),
            ("vault", vault, self.vault(vault)),
            *([("repo", repo, self.repos.get(repo))] if repo is not None else []),
        ]
        for kind, name, setting in chosen:
            if setting is None:
                # The names this user may choose, so a person (in a chat thread) can pick one.
                known = ", ".join(self.known(kind, user)) or "none"
                raise EngineError(f"unknown_{kind}", f"no {kind} named {name!r} (known: {known})")
            if not setting.allows(user):
                raise EngineError(
                    f"{kind}_not_allowed", f"the {kind} {name!r} is kept for other users"
                )


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning any mistake into one line that says what to fix."""
    toml_path = os.environ.get("LOOPBRIDGE_CONFIG")
    if toml_path and not Path(toml_path).is_file():
        raise SettingsError(f"LOOPBRIDGE_CONFIG names {toml_path}, which is not a readable file")
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        where = _where(first["loc"], overrides, toml_path)
        raise SettingsError(f"bad setting {where}: {first['msg']}") from None
    except ValueError as exc:
        raise SettingsError(f"cannot read the settings file {toml_path}: {exc}") from None


def _where(loc: tuple[int | str, ...], overrides: dict[str, object], toml_path: str | None) -> str:
    """The name a person wrote the bad value under: the environment variable, else the
    key in the settings file (the field's name only for a value given in code)."""
    path = ".".join(str(part) for part in loc) or "settings"
    field = str(loc[0]) if loc else ""
    env = f"{ENV_PREFIX}{field.upper()}"
    if field and field not in overrides and any(name.upper() == env for name in os.environ):
        return env
    if toml_path and field not in overrides:
        return f"{path} in {toml_path}"
    return path


def prepare_data_dir(settings: Settings) -> Path:
    """The data directory, made if missing; one line naming LOOPBRIDGE_HOME if it cannot be."""
    home = settings.data_dir
    if home.exists() and not home.is_dir():
        raise SettingsError(f"{ENV_PREFIX}HOME={settings.home} is a file, not a directory")
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(
            f"{ENV_PREFIX}HOME={settings.home} cannot be made: {exc.strerror}"
        ) from None
    if not os.access(home, os.W_OK | os.X_OK):
        raise SettingsError(f"{ENV_PREFIX}HOME={settings.home} is not writable")
    return home
