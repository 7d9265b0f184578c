"""Which repo, branch, profiles, vault and permission mode a chat loop starts with.

An operator maps a place to defaults in the server's settings file (the same file
that names the repos, profiles and vaults), under `[routes.<platform>."<id>"]`:

    [routes.slack.C0123ABC]        # a Slack channel
    repo = "app"
    branch = "main"

    [routes.discord."1234567890"]  # a Discord channel, or a whole server (guild)
    repo = "web"
    profiles = ["reviewer"]
    permission_mode = "acceptEdits"

(`LOOPBRIDGE_ROUTES` may hold the same tables as JSON.) The channel's entry wins over
its workspace's (Slack team, Discord guild). A mention may override any of them with
leading `name=value` words: `@bot repo=app branch=fix-login fix the flaky test`.
Names the server does not know are refused by the server when the loop is created; its
answer (which lists the known names) is shown in the thread and no loop is made.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from adapters.settings import AdapterSettingsError, settings_error
from bridge.contract.models import PermissionMode

PERMISSION_MODES: tuple[str, ...] = get_args(PermissionMode)
# The metadata key a loop's permission mode (chosen when it started) is kept under.
PERMISSION_MODE = "permission_mode"
# `name=value` at the start of a message; a value has no spaces.
OPTION = re.compile(r"([a-z_]+)=(\S+)")
NAMES = {
    "repo": "repo",
    "branch": "branch",
    "profile": "profiles",
    "profiles": "profiles",
    "vault": "vault",
    "mode": "permission_mode",
    "permission_mode": "permission_mode",
}


class Route(BaseModel):
    """The defaults of loops started in one place."""

    model_config = ConfigDict(extra="forbid")

    repo: str | None = None
    branch: str | None = None
    profiles: list[str] | None = None
    vault: str | None = None
    permission_mode: PermissionMode | None = None


class RoutingSettings(BaseSettings):
    """`[routes.<platform>.<id>]` tables of the settings file (`LOOPBRIDGE_CONFIG`)."""

    model_config = SettingsConfigDict(env_prefix="LOOPBRIDGE_", extra="ignore")

    routes: dict[str, dict[str, Route]] = Field(default_factory=dict)

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
        if toml_path and Path(toml_path).is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_path)))
        return tuple(sources)


@dataclass(frozen=True)
class LoopOptions:
    """What a new loop runs with (None: the server's default)."""

    repo: str | None = None
    branch: str | None = None
    profiles: tuple[str, ...] | None = None
    vault: str | None = None
    permission_mode: PermissionMode | None = None

    def create_args(self) -> dict[str, Any]:
        """Keyword arguments of `LoopClient.create_loop`."""
        return {
            "repo": self.repo,
            "branch": self.branch,
            "profiles": list(self.profiles) if self.profiles is not None else None,
            "vault": self.vault,
        }

    def summary(self) -> str:
        """The line a loop's first reply starts with, or "" when all are the defaults."""
        parts = []
        if self.repo:
            parts.append(f"repo `{self.repo}`" + (f" on `{self.branch}`" if self.branch else ""))
        if self.profiles:
            parts.append("profile " + ", ".join(f"`{name}`" for name in self.profiles))
        if self.vault:
            parts.append(f"vault `{self.vault}`")
        if self.permission_mode:
            parts.append(f"mode `{self.permission_mode}`")
        return "Working with " + " · ".join(parts) if parts else ""


class OptionError(ValueError):
    """An inline option the adapter can refuse by itself (an unknown option or mode)."""


@dataclass(frozen=True)
class Routes:
    """Per-place defaults of one platform."""

    table: dict[str, Route] = field(default_factory=dict)

    @classmethod
    def load(cls, platform: str) -> Routes:
        try:
            settings = RoutingSettings()
        except ValidationError as exc:
            raise settings_error(exc, "LOOPBRIDGE_") from None
        except ValueError as exc:  # an unreadable TOML file
            raise AdapterSettingsError(f"cannot read the routes: {exc}") from None
        return cls(settings.routes.get(platform, {}))

    def defaults(self, *places: str) -> LoopOptions:
        """The first place (most specific first) that has an entry decides."""
        for place in places:
            route = self.table.get(place)
            if route is not None:
                return LoopOptions(
                    route.repo,
                    route.branch,
                    tuple(route.profiles) if route.profiles is not None else None,
                    route.vault,
                    route.permission_mode,
                )
        return LoopOptions()

    def choose(self, text: str, *places: str) -> tuple[LoopOptions, str]:
        """The options of a loop started by `text` here, and the text without them."""
        inline, rest = parse_options(text)
        return merge(self.defaults(*places), inline), rest


def parse_options(text: str) -> tuple[dict[str, str], str]:
    """Leading `name=value` words of a message, and the rest of it."""
    found: dict[str, str] = {}
    rest = text.lstrip()
    while match := OPTION.match(rest):
        name = match.group(1)
        if name not in NAMES:
            known = ", ".join(sorted(NAMES))
            raise OptionError(f"`{name}=` is not an option I know (known: {known}).")
        found[NAMES[name]] = match.group(2)
        rest = rest[match.end() :].lstrip()
    return found, rest


def merge(defaults: LoopOptions, inline: dict[str, str]) -> LoopOptions:
    chosen = defaults
    if "repo" in inline and inline["repo"] != defaults.repo:
        # Another repo than the place's: its branch is not the place's either.
        chosen = replace(chosen, repo=inline["repo"], branch=None)
    if "branch" in inline:
        chosen = replace(chosen, branch=inline["branch"])
    if "profiles" in inline:
        names = tuple(name for name in inline["profiles"].split(",") if name)
        chosen = replace(chosen, profiles=names)
    if "vault" in inline:
        chosen = replace(chosen, vault=inline["vault"])
    if "permission_mode" in inline:
        mode = inline["permission_mode"]
        if mode not in PERMISSION_MODES:
            known = ", ".join(PERMISSION_MODES)
            raise OptionError(f"`{mode}` is not a permission mode (known: {known}).")
        chosen = replace(chosen, permission_mode=mode)  # type: ignore[arg-type]
    return chosen


def mode_of(metadata: dict[str, Any]) -> PermissionMode | None:
    """The permission mode a loop was started with (kept in its metadata), if any."""
    value = metadata.get(PERMISSION_MODE)
    return value if value in PERMISSION_MODES else None
