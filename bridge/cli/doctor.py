"""`loopbridge doctor`: whether what a loop needs is in place here, one line per check.

Each failed check says how to fix it. Nothing is changed: the database is only
read, and the image is only run (the agent CLI's `--version`, inside it); as root,
trying bubblewrap makes the `loopbridge-agent` user when it is missing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

import httpx
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import make_url
from sqlalchemy.engine import Connection

from core.config import Settings
from core.database_url import check_database_url
from core.engine import bundled_cli
from core.errors import EngineError, SettingsError
from core.sandbox.image import (
    RECIPE_LABEL,
    load_recipe,
    podman_argv,
    podman_env,
    recipe_path,
    run,
)
from core.sandbox.network import DEFAULT_MODEL_URL
from core.sandbox.podman import CLI_DIR, INSTALL
from core.storage import MIGRATIONS, Database

TIMEOUT_SECONDS = 20.0
MODEL_TIMEOUT = 5.0
ANTHROPIC_VERSION = "2023-06-01"
BUILD = "loopbridge sandbox build"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        fix = f" — fix: {self.fix}" if not self.ok and self.fix else ""
        return f"{mark} {self.name:<8} {self.detail}{fix}"


async def doctor(settings: Settings, *, offline: bool = False) -> bool:
    """Print one line per check; whether all passed. `offline` skips the model API."""
    cli = settings.cli_path or bundled_cli()
    model = os.environ.get("ANTHROPIC_BASE_URL") or DEFAULT_MODEL_URL
    home = check_home(settings)
    checks = await asyncio.gather(
        bounded("sandbox", check_sandbox(settings)),
        bounded("podman", check_podman(settings)),
        bounded("image", check_image(settings, cli)),
        bounded("cli", check_cli(cli)),
        bounded("model", check_model(model, offline)),
        bounded("key", check_key(model, os.environ.get("ANTHROPIC_API_KEY"), offline)),
        bounded("database", check_database(settings, home.ok)),
    )
    checks = [home, *checks]
    for check in checks:
        print(check.line(), flush=True)
    return all(check.ok for check in checks)


async def bounded(name: str, check: Awaitable[Check]) -> Check:
    """A check that hangs fails, rather than the doctor hanging with it."""
    try:
        return await asyncio.wait_for(check, TIMEOUT_SECONDS)
    except TimeoutError:
        return Check(name, False, f"no answer in {TIMEOUT_SECONDS:.0f} s")


def podman_unused(settings: Settings) -> bool:
    return settings.sandbox in ("local", "bubblewrap")


async def check_sandbox(settings: Settings) -> Check:
    """The tier agents run in here, and why not a stronger one."""
    from core.sandbox import refusal
    from core.sandbox.bubblewrap import INSTALL as BWRAP_INSTALL
    from core.sandbox.bubblewrap import usable as bubblewrap_usable
    from core.sandbox.podman import usable as podman_usable

    if settings.sandbox == "local":
        who = "loopbridge-agent" if os.geteuid() == 0 else "this user, who can read all of it"
        return Check("sandbox", True, f"local, asked for: agents run unconfined, as {who}")
    podman_why = "not asked for"
    if settings.sandbox != "bubblewrap":
        ok, podman_why = await podman_usable(settings.sandbox_image, settings.podman_url)
        if ok:
            return Check("sandbox", True, f"podman: {podman_why}")
        if settings.sandbox == "podman":
            return Check("sandbox", False, f"podman cannot run here: {podman_why}", INSTALL)
    ok, bubblewrap_why = await bubblewrap_usable(settings)
    if ok:
        weaker = f" (not podman: {podman_why})" if settings.sandbox == "auto" else ""
        return Check("sandbox", True, f"{bubblewrap_why}{weaker}")
    if settings.sandbox == "bubblewrap":
        why = f"bubblewrap cannot run here: {bubblewrap_why}"
        return Check("sandbox", False, why, BWRAP_INSTALL)
    reason, _, fix = refusal(podman_why, bubblewrap_why).rpartition("; ")
    return Check("sandbox", False, reason, fix)


async def check_podman(settings: Settings) -> Check:
    if podman_unused(settings):
        return Check("podman", True, f"not used (LOOPBRIDGE_SANDBOX={settings.sandbox})")
    if shutil.which("podman") is None:
        fix = f"{INSTALL}, or LOOPBRIDGE_SANDBOX=bubblewrap"
        return Check("podman", False, "not installed", fix)
    template = "{{.Version.Version}} {{.Host.OCIRuntime.Name}} {{.Host.CgroupManager}}"
    try:
        info = await run(
            *podman_argv(settings.podman_url), "info", "--format", template, env=podman_env()
        )
    except EngineError as exc:
        fix = "see `podman info`; loopbridge's runtime settings are in core/sandbox/containers.conf"
        return Check("podman", False, exc.message, fix)
    version, runtime, cgroups = info.split()
    return Check("podman", True, f"podman {version} with {runtime} and {cgroups}")


async def check_image(settings: Settings, cli: Path) -> Check:
    """The image exists, comes from the current recipe, and the agent CLI runs in it."""
    if podman_unused(settings):
        return Check("image", True, f"not used (LOOPBRIDGE_SANDBOX={settings.sandbox})")
    tag = settings.sandbox_image
    try:
        podman = podman_argv(settings.podman_url)
    except EngineError:
        return Check("image", False, f"{tag}: podman is not installed", INSTALL)
    template = f'{{{{index .Labels "{RECIPE_LABEL}"}}}}'
    try:
        built_from = await run(
            *podman, "image", "inspect", "--format", template, tag, env=podman_env()
        )
    except EngineError:
        return Check("image", False, f"{tag} is not built", BUILD)
    recipe = recipe_path(settings.data_dir)
    if built_from.strip() != load_recipe(recipe).digest:
        return Check("image", False, f"{tag} was built from another recipe than {recipe}", BUILD)
    if not os.access(cli, os.X_OK):
        return Check("image", True, f"{tag}, current recipe (no agent CLI to try in it)")
    inside = f"{CLI_DIR}/{cli.name}"
    try:
        version = await run(
            *podman,
            "run",
            "--rm",
            "--network=none",
            "--read-only",
            "--cap-drop=ALL",
            f"--volume={cli.parent}:{CLI_DIR}:ro",
            "--env=HOME=/tmp",
            tag,
            inside,
            "--version",
            env=podman_env(),
        )
    except EngineError as exc:
        fix = f"add what it needs to {recipe} (see core/sandbox/README.md), then {BUILD}"
        return Check("image", False, f"the agent CLI does not run in {tag}: {exc.message}", fix)
    return Check("image", True, f"{tag}, current recipe; the CLI runs in it ({version.strip()})")


async def check_cli(cli: Path) -> Check:
    fix = "pip install --force-reinstall claude-agent-sdk, or set LOOPBRIDGE_CLI_PATH"
    if not os.access(cli, os.X_OK):
        return Check("cli", False, f"no executable agent CLI at {cli}", fix)
    try:
        version = await run(str(cli), "--version")
    except (EngineError, OSError) as exc:
        return Check("cli", False, f"{cli} --version failed: {exc}", fix)
    return Check("cli", True, f"{version.strip()} at {cli}")


def check_home(settings: Settings) -> Check:
    """The data directory is a writable directory, or can be made (nothing is made here)."""
    home = settings.data_dir
    shown = f"LOOPBRIDGE_HOME={settings.home}"
    if home.is_dir():
        if os.access(home, os.W_OK | os.X_OK):
            return Check("home", True, f"{home}")
        return Check("home", False, f"{shown} is not writable", "fix its permissions")
    if home.exists():
        return Check("home", False, f"{shown} is a file, not a directory", "point it elsewhere")
    parent = next((p for p in home.parents if p.exists()), None)
    if parent is not None and parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
        return Check("home", True, f"{home} will be made at the first start")
    return Check("home", False, f"{shown} cannot be made (in {parent})", "point it elsewhere")


async def check_model(url: str, offline: bool = False) -> Check:
    """Any HTTP answer will do: this checks the way there (check_key checks the key)."""
    if offline:
        return Check("model", True, f"{url} not tried (--offline)")
    try:
        async with httpx.AsyncClient(timeout=MODEL_TIMEOUT) as http:
            response = await http.get(url)
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        fix = "start the model endpoint, or point ANTHROPIC_BASE_URL at one (--offline skips this)"
        return Check("model", False, f"{url} is unreachable: {reason}", fix)
    return Check("model", True, f"{url} answers (HTTP {response.status_code})")


async def check_key(url: str, key: str | None, offline: bool = False) -> Check:
    """ANTHROPIC_API_KEY is set and the model API takes it: listing models costs nothing
    and answers 401 for a key it refuses."""
    fix = "export ANTHROPIC_API_KEY=sk-ant-… (console.anthropic.com → API keys)"
    if not key:
        return Check(
            "key", False, "ANTHROPIC_API_KEY is not set: agents cannot reach the model", fix
        )
    if offline:
        return Check("key", True, "ANTHROPIC_API_KEY is set (not tried: --offline)")
    headers = {"x-api-key": key, "anthropic-version": ANTHROPIC_VERSION}
    try:
        async with httpx.AsyncClient(timeout=MODEL_TIMEOUT) as http:
            response = await http.get(
                f"{url.rstrip('/')}/v1/models", params={"limit": 1}, headers=headers
            )
    except httpx.HTTPError:
        return Check(
            "key",
            True,
            "ANTHROPIC_API_KEY is set (not tried: the model API is unreachable, see above)",
        )
    if response.status_code in (401, 403):
        return Check(
            "key", False, f"{url} refused ANTHROPIC_API_KEY (HTTP {response.status_code})", fix
        )
    if response.is_success:
        return Check("key", True, f"ANTHROPIC_API_KEY accepted by {url}")
    return Check(
        "key",
        True,
        f"ANTHROPIC_API_KEY is set ({url} answered HTTP "
        f"{response.status_code} to a model list: the key is not verified)",
    )


async def check_database(settings: Settings, home_ok: bool = True) -> Check:
    url = settings.resolved_database_url
    fix = "check LOOPBRIDGE_DATABASE_URL and that the database server runs"
    try:
        parts = check_database_url(url)
    except SettingsError as exc:
        if not settings.database_url and not settings.data_dir.is_dir():
            # The default database goes in a data directory that start-up will make.
            return Check(
                "database",
                home_ok,
                "SQLite in the data directory, made at the first start"
                if home_ok
                else "no data directory (see home)",
            )
        return Check("database", False, str(exc), "set LOOPBRIDGE_DATABASE_URL as it says")
    shown = parts.render_as_string(hide_password=True)
    if sqlite_not_created(url):
        # Connecting would create it; the server does that, with its schema, at start.
        return Check("database", True, f"{shown} will be created at the server's first start")
    try:
        db = Database(url)
    except SettingsError as exc:
        return Check("database", False, str(exc), fix)
    try:
        async with db.engine.connect() as conn:
            current = await conn.run_sync(revision)
    except Exception as exc:  # any driver's connection error
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return Check("database", False, f"{shown}: {type(exc).__name__}: {reason}", fix)
    finally:
        await db.close()
    head = newest_revision()
    if current == head:
        return Check("database", True, f"{shown}, schema at {head}")
    return Check("database", True, f"{shown}, schema {current} (migrated to {head} at start)")


def sqlite_not_created(url: str) -> bool:
    parts = make_url(url)
    return parts.get_backend_name() == "sqlite" and not Path(parts.database or "").is_file()


def revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def newest_revision() -> str | None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(config).get_current_head()
