"""Where a loop's agent runs: its working directory, home and process."""

from __future__ import annotations

import logging
from pathlib import Path

from core.config import Settings
from core.errors import EngineError, SettingsError
from core.sandbox.base import AgentHost, Sandbox, SandboxSpec
from core.sandbox.local import LocalSandbox

__all__ = ["AgentHost", "LocalSandbox", "Sandbox", "SandboxSpec", "choose_sandbox"]

log = logging.getLogger(__name__)


async def choose_sandbox(settings: Settings, cli_path: Path) -> Sandbox:
    """The backend the settings ask for: `auto` takes podman when it works here."""
    if settings.sandbox == "local":
        return LocalSandbox(settings.data_dir, cli_path)
    from core.sandbox.podman import PodmanSandbox, usable  # podman-py only when asked for

    ok, why = await usable(settings.sandbox_image, settings.podman_url)
    if ok:
        sandbox = PodmanSandbox(settings.data_dir, cli_path, settings)
        # Started here, not only in `Engine.start`: podman may look usable and still fail
        # (no package lists to build the image from, a broken service), and `auto` must
        # then fall back rather than refuse to start.
        try:
            await sandbox.start()
            return sandbox
        except EngineError as exc:
            why = exc.message
    if settings.sandbox == "podman":
        raise SettingsError(f"LOOPBRIDGE_SANDBOX=podman, but podman cannot run here: {why}")
    log.warning("agents run as local processes, without a sandbox: %s", why)
    return LocalSandbox(settings.data_dir, cli_path)
