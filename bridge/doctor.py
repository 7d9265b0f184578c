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
from core.sandbox.podman import CLI_DIR, DEFAULT_MODEL_URL, INSTALL
from core.storage import MIGRATIONS, Database

TIMEOUT_SECONDS = 20.0
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


async def doctor(settings: Settings) -> bool:
    """Print one line per check; whether all passed."""
    cli = settings.cli_path or bundled_cli()
    model = os.environ.get("ANTHROPIC_BASE_URL") or DEFAULT_MODEL_URL
    checks = await asyncio.gather(
        bounded("sandbox", check_sandbox(settings)),
        bounded("podman", check_podman(settings)),
        bounded("image", check_image(settings, cli)),
        bounded("cli", check_cli(cli)),
        bounded("model", check_model(model)),
        bounded("database", check_database(settings.resolved_database_url)),
    )
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
            *podman, "run", "--rm", "--network=none", "--read-only", "--cap-drop=ALL",
            f"--volume={cli.parent}:{CLI_DIR}:ro", "--env=HOME=/tmp", tag, inside, "--version",
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


async def check_model(url: str) -> Check:
    """Any HTTP answer will do: this checks the way there, not the key."""
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            response = await http.get(url)
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        fix = "start the model endpoint, or point ANTHROPIC_BASE_URL at one"
        return Check("model", False, f"{url} is unreachable: {reason}", fix)
    return Check("model", True, f"{url} answers (HTTP {response.status_code})")


async def check_database(url: str) -> Check:
    shown = make_url(url).render_as_string(hide_password=True)
    fix = "check LOOPBRIDGE_DATABASE_URL and that the database server runs"
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
        return Check("database", False, f"{shown}: {type(exc).__name__}: {exc}", fix)
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
