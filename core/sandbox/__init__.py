"""Where a loop's agent runs: its working directory, home and process."""

from __future__ import annotations

import logging
from pathlib import Path

from core.config import Settings
from core.errors import EngineError, SettingsError
from core.sandbox.base import AgentHost, Sandbox, SandboxSpec
from core.sandbox.local import LocalSandbox

__all__ = [
    "AgentHost",
    "LocalSandbox",
    "RefusingSandbox",
    "Sandbox",
    "SandboxSpec",
    "choose_sandbox",
]

log = logging.getLogger(__name__)


class RefusingSandbox(Sandbox):
    """`auto` found no sandbox that works here: the server runs, every turn is refused."""

    name = "none"

    def __init__(self, data_dir: Path, cli_path: Path, reason: str) -> None:
        super().__init__(data_dir, cli_path)
        self.reason = reason

    async def acquire(self, spec: SandboxSpec) -> tuple[AgentHost, bool]:
        raise EngineError("sandbox_spawn_failed", self.reason)


async def choose_sandbox(settings: Settings, cli_path: Path) -> Sandbox:
    """The backend the settings ask for; `auto` takes podman, else bubblewrap, else none:
    an agent never runs unconfined unless `local` is asked for by name."""
    if settings.sandbox == "local":
        return LocalSandbox(settings.data_dir, cli_path)
    podman_why = "not tried"
    if settings.sandbox in ("podman", "auto"):
        podman, podman_why = await start_podman(settings, cli_path)
        if podman is not None:
            return podman
        if settings.sandbox == "podman":
            raise SettingsError(
                f"LOOPBRIDGE_SANDBOX=podman, but podman cannot run here: {podman_why}"
            )
    from core.sandbox.bubblewrap import BubblewrapSandbox

    bubblewrap = BubblewrapSandbox(settings.data_dir, cli_path, settings)
    try:
        await bubblewrap.start()
        return bubblewrap
    except EngineError as exc:
        bubblewrap_why = exc.message
    if settings.sandbox == "bubblewrap":
        raise SettingsError(
            f"LOOPBRIDGE_SANDBOX=bubblewrap, but bubblewrap cannot run here: {bubblewrap_why}"
        )
    reason = refusal(podman_why, bubblewrap_why)
    # The server still starts (its API, history and settings work); each turn says this.
    log.warning("loopbridge: %s", reason)
    return RefusingSandbox(settings.data_dir, cli_path, reason)


async def start_podman(settings: Settings, cli_path: Path) -> tuple[Sandbox | None, str]:
    """The podman backend started, or why it cannot run here."""
    from core.sandbox.podman import PodmanSandbox, usable  # podman-py only when asked for

    ok, why = await usable(settings.sandbox_image, settings.podman_url)
    if not ok:
        return None, why
    sandbox = PodmanSandbox(settings.data_dir, cli_path, settings)
    # Started here, not only in `Engine.start`: podman may look usable and still fail
    # (no package lists to build the image from, a broken service).
    try:
        await sandbox.start()
    except EngineError as exc:
        return None, exc.message
    return sandbox, why


def refusal(podman_why: str, bubblewrap_why: str) -> str:
    return (
        f"no sandbox can run agents here (podman: {podman_why}; bubblewrap: {bubblewrap_why}); "
        "install podman or bubblewrap, or set LOOPBRIDGE_SANDBOX=local on a single-user machine"
    )
